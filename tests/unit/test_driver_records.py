"""The driver takes only plain records of known kinds from workers, and a malformed one never stops it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastictrain.events import check, event
from elastictrain.runtime.records import MAX_STRING, accept_records, check_result, clip, to_plain
from tests.unit.test_driver import _driver, _kinds, _tick


class Strange:
    """An object a worker should never send."""


def _nested(depth):
    value = [1]
    for _ in range(depth):
        value = [value]
    return value


MALFORMED = [
    ("a string", "a str, not a dict"),
    (["commit"], "a list, not a dict"),
    ({"kind": "no_such_kind", "time": 1.0}, "kind 'no_such_kind' is not one a worker sends"),
    ({"kind": "worker_lost", "member": "w", "reason": "x", "time": 1.0}, "not one a worker sends"),  # a driver kind
    ({"time": 1.0}, "kind 'None'"),
    (event("commit", term=1, step=2, rank=0) | {"time": None}, "'time' is a NoneType"),
    ({"kind": "commit", "term": 1, "step": 2, "time": 1.0}, "without ['rank']"),
    (event("commit", term="1", step=2, rank=0), "'term' is a str"),
    (event("commit", term=1, step=True, rank=0), "'step' is a bool"),
    (event("joined", term=1, rank=0, world_size=2, leader=1, member="w"), "'leader' is a int"),
    (event("joined", term=1, rank=0, world_size=2, leader=True, member=["w"]), "'member' is a list"),
    (event("error", reason="x" * (MAX_STRING + 1)), "a string of"),
    (event("metrics", step=1, term=1, big=[0.0] * 600_000), "over"),
    (event("metrics", step=1, term=1, obj=Strange()), "a Strange, not plain data"),
    (event("metrics", step=1, term=1, t=torch.zeros(2)), "a Tensor, not plain data"),
    (event("metrics", step=1, term=1, d={1: 2}), "a dict key of type int"),
    (event("metrics", step=1, term=1, deep=_nested(40)),
     "nested deeper"),
]


@pytest.mark.parametrize("record, reason", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_records_are_dropped_with_an_event_and_the_driver_goes_on(record, reason):
    driver, workers, clock = _driver()
    driver.start()
    good = event("commit", term=1, step=0, rank=0, member="w1")
    workers.records += [good, record, event("checkpoint_skipped", checkpoint="c", reason="damaged")]
    assert _tick(driver, clock)
    dropped = driver.log.events[-1]
    assert dropped["kind"] == "records_dropped" and dropped["count"] == 1 and reason in dropped["reason"], dropped
    check(dropped)
    assert driver.log.newest_step == 0 and "checkpoint_skipped" in _kinds(driver)  # the good ones are kept
    assert driver.failure is None and driver.view is not None
    assert driver.result().commit_spans == [(1, 0, 0)]


def test_genuine_records_pass_and_one_event_sums_up_a_batch_of_bad_ones():
    genuine = [
        event("commit", term=1, step=3, rank=0, member="w1"),
        event("metrics", step=3, term=1, member="w1", loss=0.5, params=[1.0, 2.0], nested={"a": [None, True]}),
        event("metrics", step="odd", term=None, member="w1"),
        event("joined", term=1, rank=0, world_size=2, leader=True, member="w1", pid=5, node_id="n"),
        event("world_changed", term=1, step=3, reason="peer lost", in_flight=None, member="w1"),
        event("recovered", term=2, world_size=2, resumed_from=3, recovery_s=0.5, elected_s=0.1, restored_s=0.2),
        event("checkpoint", term=None, step=None),
    ]
    kept, dropped = accept_records(genuine + [1, 2, {"kind": "error"}])
    assert kept == genuine
    assert dropped["count"] == 3 and dropped["reason"] == "a int, not a dict"
    kept, dropped = accept_records({"not": "a list"})
    assert kept == [] and "not a list" in dropped["reason"]
    assert accept_records(genuine) == (genuine, None)


def test_a_dropped_records_reason_names_its_sender_and_is_bounded():
    _, dropped = accept_records([{"kind": "nope", "member": "w7" * 1000, "time": 1.0}])
    assert dropped["reason"].startswith("from 'w7w7") and len(dropped["reason"]) < 200


@pytest.mark.parametrize("out, ok", [
    ({"status": "finished", "step": 3}, True),
    ({"status": "ended", "outcome": "done", "step": None}, True),
    ({"status": "left", "step": 4, "member": "w", "node": {}}, True),
    (None, False), ("finished", False), ({"status": "exploded"}, False), ({"status": "finished", "step": "3"}, False),
    ({"status": "finished", "step": True}, False), ({"step": 3}, False),
])
def test_a_workers_run_result_is_checked(out, ok):
    assert (check_result(out) is None) == ok


def test_a_malformed_run_result_counts_as_a_lost_worker_not_a_driver_crash():
    from elastictrain.runtime.ray_workers import RayWorkers

    killed = []
    backend = RayWorkers.__new__(RayWorkers)  # no Ray: only `_exit`'s handling of what the worker returned
    backend.refs = {"ref": "w1"}
    backend.kill = killed.append
    backend.ray = type("FakeRay", (), {"get": staticmethod(lambda ref: ["not", "a", "dict"]),
                                       "exceptions": __import__("ray").exceptions})
    ended = backend._exit("ref")
    assert ended.lost is not None and "malformed run result" in ended.lost and killed == ["w1"]
    driver, workers, clock = _driver(max_failures=1)
    driver.start()
    workers.pending_exits.append(type(ended)(workers.started[0], lost=ended.lost))
    assert _tick(driver, clock) and _kinds(driver)[-2:] == ["worker_lost", "worker_started"]


def test_reports_are_made_plain_on_the_worker():
    assert to_plain({"a": torch.tensor(1.5), "b": np.float32(2), "c": (1, torch.zeros(2)), "d": np.arange(3),
                     "e": np.bool_(True), "f": {"g": [np.int64(4)]}}) == \
        {"a": 1.5, "b": 2.0, "c": [1, [0.0, 0.0]], "d": [0, 1, 2], "e": True, "f": {"g": [4]}}
    with pytest.raises(TypeError, match=r"metrics\['x'\]\[1\] is a Strange"):
        to_plain({"x": [1, Strange()]})
    with pytest.raises(TypeError, match="keyed by strings"):
        to_plain({"x": {1: 2}})


def test_clip_bounds_a_workers_error_reason():
    assert clip("short") == "short"
    assert len(clip("x" * (MAX_STRING * 2))) < MAX_STRING + 50 and clip(Strange()) == "(a Strange)"
