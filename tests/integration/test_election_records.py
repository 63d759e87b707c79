"""Garbage and forged election records planted in a real run's Ray KV namespace, as a holder of the
cluster token could: the run completes with the right model, the driver never crashes, the events
name every rejected record."""

from __future__ import annotations

import signal

from elastictrain.election.ray_store import RayKVStore
from elastictrain.election.term import Member
from elastictrain.testing.toy import ToyTask
from tests.fault.faults import At, a_follower
from tests.toy_runs import assert_matches_one_process, fit_toy

INFLATED = 10**9


def _plant_then_kill_a_follower(view) -> None:
    store = RayKVStore(view._driver.spec.namespace)
    store.put("member/evil", b"{}")
    store.put("member/junk", b"\xff\x00 not json")
    store.put("leader/999999999999", b"evil")  # a far-future term: would fence every later save
    store.put("leader/000000000002", store.get("leader/000000000001"))  # a genuine record moved to term 2
    store.put("join/000000000002/evil", Member("evil", 0.0, committed_step=INFLATED).to_json())
    store.put("outcome", b"done")  # a premature outcome: would end the run
    # The worst case: a bid sealed with the run's secret (an insider), inflated beyond any commit.
    liar = Member("liar", 0.0, committed_step=INFLATED)
    view._driver.election.register(liar)
    view._driver.election.join(3, liar)
    view.signal(a_follower(view), signal.SIGKILL)  # the rebuild runs through the squatted term 2


def test_forged_records_are_rejected_and_the_run_completes(ray_session):
    task = ToyTask(total_steps=16)
    plant = At(4, _plant_then_kill_a_follower, min_members=3)
    result = fit_toy(task, workers=(2, 3), callbacks=[plant], hold_at=5)
    assert plant.fired_at is not None
    assert result.steps == 16
    assert_matches_one_process(result, task)
    rejected = {e["key"] for e in result.events if e["kind"] == "record_rejected"}
    assert {"member/evil", "member/junk", "leader/999999999999", "leader/000000000002", "outcome"} <= rejected
    assert "join/000000000003/liar" in rejected  # left out of term 3: nobody backs its step
    terms = sorted({e["term"] for e in result.events if e["kind"] == "world"})
    assert 2 not in terms and terms[0] == 1 and terms[-1] >= 3  # nobody could lead the squatted term 2
    assert all(INFLATED not in (e.get("resumed_from"), e.get("step")) for e in result.events)
