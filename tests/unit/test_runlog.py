"""The driver's run log: records folded per step, without Ray."""

from __future__ import annotations

import gc
import tracemalloc
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.runtime import runlog
from elastictrain.runtime.runlog import History, RunLog, count_redone, expand_commits


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


# --- reports stored column-wise ----------------------------------------------------------


class _DictLog:
    """The fold as a dict per step holding the report dicts themselves: the model the column store must match."""

    def __init__(self):
        self.reports, self.unstepped = {}, []

    def add(self, record):
        metrics = {k: v for k, v in record.items() if k not in ("kind", "member", "replay")}
        step = record.get("step")
        if step is None:
            self.unstepped = (self.unstepped + [metrics])[-runlog.UNSTEPPED_KEPT:]
            return
        term = int(record.get("term") or 0)
        held = self.reports.get(step)
        if record.get("replay"):
            if held is None:
                self.reports[step] = (term, [metrics])
        elif held is None or term > held[0]:
            self.reports[step] = (term, [metrics])
        elif term == held[0]:
            held[1].append(metrics)

    def history(self):
        return [m for step in sorted(self.reports) for m in self.reports[step][1]] + self.unstepped

    def final_metrics(self):
        if self.reports:
            return self.reports[max(self.reports)][1][-1]
        return self.unstepped[-1] if self.unstepped else {}


def _typed(report):
    """A report with its keys' order and its values' exact types, so 1 and 1.0 and True differ."""
    return [(k, type(v).__name__, v) for k, v in report.items()]


_values = st.one_of(
    st.floats(allow_nan=False), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
    st.booleans(), st.none(),
    st.text(max_size=3), st.lists(st.floats(allow_nan=False), max_size=2),
)
_reports = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(0, 6), st.just(2**64), st.just(2.5)),  # step
        st.integers(0, 3),  # term
        st.booleans(),  # replay
        st.dictionaries(st.sampled_from(["loss", "lr", "acc", "params"]), _values, max_size=3),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_reports, st.sampled_from([runlog.MAX_LAYOUTS, 1]))
def test_history_and_final_metrics_are_those_of_a_dict_per_report(reports, max_layouts):
    log, model = RunLog(), _DictLog()
    with mock.patch.object(runlog, "MAX_LAYOUTS", max_layouts):  # 1: most layouts go to the dict fallback
        for i, (step, term, replay, metrics) in enumerate(reports):
            record = {"kind": "metrics", "time": float(i), "step": step, "term": term, "member": "m", **metrics}
            if replay:
                record["replay"] = True
            log.add(record)
            model.add(record)
            assert _typed(log.final_metrics()) == _typed(model.final_metrics())
        history = log.history()
    assert [_typed(h) for h in history] == [_typed(h) for h in model.history()]
    assert len(history) == len(model.history())


def test_history_is_a_read_only_sequence_of_new_dicts():
    log = RunLog()
    for step in range(5):
        log.add(_report(step, 1, loss=step / 10))
    log.add({"kind": "metrics", "time": 9.0, "step": None, "term": 1, "done": True})
    history = log.history()
    assert isinstance(history, History) and len(history) == 6
    assert history[-1] == {"time": 9.0, "step": None, "term": 1, "done": True}
    assert [h["step"] for h in history[1:3]] == [1, 2] and [h["step"] for h in reversed(history)][:2] == [None, 4]
    assert history == list(history) and history != list(history)[:-1]
    history[0]["loss"] = 99.0  # a copy: the run's record is unchanged
    assert history[0]["loss"] == 0.0 and log.history()[0]["loss"] == 0.0
    with pytest.raises(IndexError):
        history[6]
    log.add(_report(5, 1, loss=0.5))  # a history taken earlier does not change
    assert len(history) == 6 and len(log.history()) == 7


def test_a_report_whose_step_is_not_a_number_is_kept_with_the_unstepped_ones():
    log = RunLog()
    log.add(_report(2, 1, loss=1.0))
    log.add({"kind": "metrics", "time": 3.0, "step": "eval", "term": 1, "acc": 0.5})  # does not order with numbers
    log.add(_report(1, 1, loss=2.0))
    assert [h["step"] for h in log.history()] == [1, 2, "eval"]
    assert log.final_metrics()["step"] == 2


def test_a_report_of_numbers_costs_tens_of_bytes_not_a_dict():
    """A dict of these six entries with its boxed numbers alone is over 300 bytes; the columns take 8 per number."""
    steps = 20_000
    gc.collect()
    tracemalloc.start()
    try:
        log = RunLog()
        for step in range(steps):
            log.add({"kind": "metrics", "time": 1.7e9 + step, "step": step, "term": 1, "member": "w000-abcdef",
                     "loss": 1.0 / (step + 1), "lr": 3e-4 * (step % 7)})
        history = log.history()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(history) == steps and history[-1]["loss"] == 1.0 / steps
    assert kept / steps < 150, f"{kept / steps:.0f} bytes per report"
