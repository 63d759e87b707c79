"""The driver's run log: records folded per step, without Ray."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from elastictrain.runtime.runlog import RunLog, count_redone, expand_commits


def _report(step, term, replay=False, **metrics):
    record = {"kind": "metrics", "time": float(step), "step": step, "term": term, "member": "m", **metrics}
    if replay:
        record["replay"] = True
    return record


def test_final_metrics_are_those_of_the_highest_step_whatever_arrived_last():
    log = RunLog()
    log.add(_report(9, 1, params=[1.0]))
    log.add(_report(3, 1, loss=0.5))  # late: a record of an earlier step that arrived after the last one
    assert log.final_metrics()["params"] == [1.0]
    assert [h["step"] for h in log.history()] == [3, 9]


def test_a_replayed_report_fills_a_missing_step_and_never_replaces_one_that_arrived():
    log = RunLog()
    log.add(_report(4, 1, loss=1.0))
    # rank 0 died with step 5's report unsent; the new rank 0 resends what it kept of steps 4 and 5
    log.add(_report(4, 1, replay=True, loss=99.0))
    log.add(_report(5, 1, replay=True, loss=2.0, params=[0.5]))
    assert [(h["step"], h["loss"]) for h in log.history()] == [(4, 1.0), (5, 2.0)]
    assert log.final_metrics()["params"] == [0.5]
    assert all("replay" not in h and "member" not in h and "kind" not in h for h in log.history())


def test_a_step_computed_again_in_a_later_term_keeps_only_its_last_computation():
    log = RunLog()
    log.add(_report(7, 1, loss=1.0))
    log.add(_report(7, 1, acc=0.1))  # two reports in one step of one term are both kept
    log.add(_report(7, 2, loss=3.0))
    log.add(_report(7, 1, loss=5.0))  # a straggler of the older term changes nothing
    assert [h.get("loss") for h in log.history()] == [3.0]


def test_reports_outside_the_loop_are_kept_bounded():
    log = RunLog()
    for i in range(1500):
        log.add({"kind": "metrics", "time": 0.0, "step": None, "term": 1, "i": i})
    history = log.history()
    assert len(history) == 1000 and history[-1]["i"] == 1499
    assert log.final_metrics()["i"] == 1499


def test_commits_of_every_rank_fold_into_one_span_per_term():
    log = RunLog()
    for term, steps in ((1, range(0, 10)), (2, range(8, 20))):
        for step in steps:
            for rank in range(3):
                assert log.add({"kind": "commit", "time": 0.0, "term": term, "step": step, "rank": rank}) is None
    assert log.commit_spans() == [(1, 0, 9), (2, 8, 19)]
    assert log.newest_step == 19
    assert count_redone(log.commit_spans()) == 2  # steps 8 and 9 were committed twice


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 40), st.integers(0, 8)), max_size=12))
def test_count_redone_is_the_sum_over_steps_of_extra_terms(raw):
    spans = [(term, first, first + length) for term, first, length in raw]
    by_step: dict[int, int] = {}
    for _, step in expand_commits(spans):
        by_step[step] = by_step.get(step, 0) + 1
    assert count_redone(spans) == sum(n - 1 for n in by_step.values())


def test_a_step_lost_in_flight_counts_once_however_many_survivors_saw_it():
    log = RunLog()
    for member in ("a", "b"):
        event = {"kind": "world_changed", "time": 1.0, "term": 1, "step": 5, "in_flight": 5, "member": member}
        assert log.add(event) is event
    log.add({"kind": "world_changed", "time": 2.0, "term": 2, "step": 9, "in_flight": None, "member": "a"})
    assert log.steps_lost_in_flight() == 1
    assert [e["kind"] for e in log.all_events()] == ["world_changed"] * 3


def test_worlds_become_one_event_per_term_with_its_leader():
    log = RunLog()
    for member, rank in (("a", 0), ("b", 1)):
        log.add({"kind": "joined", "time": 1.0, "term": 1, "rank": rank, "world_size": 2, "leader": rank == 0,
                 "member": member, "pid": 1, "node_id": "n"})
    log.add({"kind": "joined", "time": 2.0, "term": 2, "rank": 0, "world_size": 1, "leader": True, "member": "b"})
    worlds = [e for e in log.all_events() if e["kind"] == "world"]
    assert [(w["term"], w["world_size"], w["leader"]) for w in worlds] == [(1, 2, "a"), (2, 1, "b")]
    assert set(log.world_members) == {"b"} and log.newest_term == 2
