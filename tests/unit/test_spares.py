"""Warm spares (`ScalingConfig.spares`): the pool the driver keeps, and how a waiting spare meets the rendezvous.

No Ray: the driver is stepped by hand over fake workers, the rendezvous runs in threads on an in-memory store.
"""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.heartbeat import Beat
from elastictrain.election.policy import decide_gather, should_grow
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import Member
from elastictrain.runtime.driver import Driver, WorkerExit
from elastictrain.runtime.policy import Decision, PlacementPolicy
from elastictrain.runtime.rendezvous import Rendezvous, RendezvousPolicy
from elastictrain.runtime.spec import RunSpec
from tests.unit.test_driver import Clock, FakeWorkers


def _driver(max_workers=2, spares=1, max_failures=5, **failure):
    spec = RunSpec(run_id="r", namespace="ns",
                   scaling=ScalingConfig(min_workers=1, max_workers=max_workers, spares=spares),
                   batch=BatchConfig(global_batch_size=8), checkpoint=CheckpointConfig(),
                   failure=FailureConfig(max_failures=max_failures, **failure), run=RunConfig(progress=False))
    workers, clock = FakeWorkers(), Clock()
    return Driver(spec, workers, Election(MemoryStore()), clock=clock), workers, clock


def _tick(driver, clock, seconds=1.0):
    clock.now += seconds
    return driver.step()


# --- config and placement ---------------------------------------------------------------------


def test_spares_default_to_none_and_cannot_be_negative():
    assert ScalingConfig().spares == 0
    with pytest.raises(ValidationError, match="spares"):
        ScalingConfig(spares=-1)


@pytest.mark.parametrize("max_workers,spares", [(2, 0), (2, 1), (3, 2)])
def test_the_pool_is_max_workers_plus_spares_and_refills_each_loss(max_workers, spares):
    placement = PlacementPolicy(ScalingConfig(max_workers=max_workers, spares=spares))
    assert placement.start() == Decision(spawn=max_workers + spares)
    ids = [f"w{i}" for i in range(max_workers + spares)]
    for m in ids:
        placement.spawned(m)
    assert placement.gone(ids[0]) == Decision(spawn=1)  # a world member or a spare: one replacement
    placement.spawned("w-new")
    assert placement.gone(ids[-1]) == Decision(spawn=1)


def test_the_driver_starts_the_spares_placed_like_the_others_and_replaces_a_consumed_one():
    driver, workers, clock = _driver(max_workers=2, spares=1)
    driver.start()
    assert len(workers.started) == 3
    assert workers.options == [driver.placement.actor_options()] * 3  # same resources and labels as the world's
    lost = workers.started[0]
    workers.pending_exits.append(WorkerExit(lost, lost="RayActorError"))  # a world member dies: the spare steps in
    assert _tick(driver, clock)
    assert len(workers.started) == 4 and len(driver.placement.active) == 3  # a new spare, in the background
    spare = workers.started[2]
    workers.pending_exits.append(WorkerExit(spare, lost="RayActorError"))  # a waiting spare dies: replaced too
    assert _tick(driver, clock)
    assert len(workers.started) == 5 and len(driver.placement.active) == 3


def test_no_spare_is_started_once_the_run_ended():
    driver, workers, clock = _driver(max_workers=2, spares=2)
    driver.start()
    a, b, c, d = workers.started
    workers.pending_exits.append(WorkerExit(a, status="finished", step=3))
    assert _tick(driver, clock)
    workers.pending_exits.append(WorkerExit(c, lost="RayActorError"))
    _tick(driver, clock)
    assert len(workers.started) == 4


def test_a_waiting_spare_is_not_judged_hung_but_a_silent_one_is_killed():
    """A spare beats with its loop idle (it waits in the rendezvous): no progress is due from it however long it
    waits; a spare whose beats stop is hung like any worker, killed, and replaced."""
    driver, workers, clock = _driver(max_workers=1, spares=1, heartbeat_timeout_s=3.0, collective_timeout_s=1.0,
                                     hang_timeout_s=5.0)
    driver.start()
    member, spare = workers.started
    for m in (member, spare):
        driver.election.register(Member(m, joined_at=0.0))
    for seq in range(1, 12):  # 11 s: more than twice hang_timeout_s with the spare's progress standing still
        driver.election.heartbeat(member, Beat(seq=seq, progress=seq, in_loop=True))
        driver.election.heartbeat(spare, Beat(seq=seq, progress=0, in_loop=False))
        assert _tick(driver, clock, 1.0)
    assert workers.killed == []
    for _ in range(5):  # the spare's beats stop
        driver.election.heartbeat(member, Beat(seq=100 + _, progress=100 + _, in_loop=True))
        _tick(driver, clock, 1.0)
    assert workers.killed == [spare]
    assert [e["member"] for e in driver.log.events if e["kind"] == "heartbeat_lapsed"] == [spare]


# --- the rendezvous ---------------------------------------------------------------------------


def test_a_waiting_spare_neither_delays_a_full_world_nor_asks_it_to_grow():
    now = 100.0
    # Three live members, two of them joined: a full world of two is published at once, startup wait or not.
    decision = decide_gather(joined={"a", "b"}, live={"a", "b", "s"}, min_workers=1, max_workers=2, now=now,
                             started_at=now, rendezvous_timeout=60, below_min_timeout=600, startup_wait=30)
    assert decision.publish
    from elastictrain.election.policy import assign_ranks

    plan = assign_ranks(1, "a", [Member("a", 0.0), Member("b", 1.0), Member("s", 2.0)], max_workers=2,
                        host="127.0.0.1", port=0)
    assert plan.members == ("a", "b")
    assert not should_grow(plan, {"s"}, max_workers=2)


SPARE_POLICY = RendezvousPolicy(min_workers=1, max_workers=2, heartbeat_timeout_s=5.0, rendezvous_timeout_s=20.0,
                                below_min_timeout_s=20.0, startup_wait_s=20.0)


class _Member(threading.Thread):
    """One member's `next_world` call in a thread, its world (or error) kept."""

    def __init__(self, election: Election, member: Member, **kwargs) -> None:
        super().__init__(name=f"rdzv-{member.id}", daemon=True)
        self.rendezvous = Rendezvous(election, member.id, SPARE_POLICY, open_store=lambda: ("127.0.0.1", 0, None))
        self.member, self.kwargs = member, kwargs
        self.world = self.error = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.world = self.rendezvous.next_world(self.member, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - asserted by the test
            self.error = exc
        finally:
            self.done.set()


def _wait(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_spare_waits_outside_the_full_first_world_and_joins_the_rebuild_after_a_loss_ranked_last():
    election = Election(MemoryStore())
    a, b, s = Member("a", 0.0), Member("b", 1.0), Member("s", 2.0)
    for m in (a, b, s):
        election.register(m)
    first = [_Member(election, m, last_term=0, was_member=False) for m in (a, b, s)]
    members, spare = first[:2], first[2]
    survivor = None
    started = time.monotonic()
    try:
        for t in members:
            t.start()
        # The spare (registered, live, not yet in the rendezvous) does not hold up a world at max_workers.
        assert all(t.done.wait(10) for t in members), "the first world was not published"
        assert time.monotonic() - started < SPARE_POLICY.startup_wait_s / 2
        world1 = members[0].world
        assert world1.term == 1 and sorted(world1.members) == ["a", "b"]
        spare.start()
        assert _wait(lambda: spare.rendezvous.spare_since is not None), "the spare never noticed it waits outside"
        assert not spare.done.is_set()

        # `b` dies; `a` (state at step 7) rebuilds and the spare joins the very next term.
        election.mark_dead("b")
        election.heartbeat("s")
        survivor = _Member(election, Member("a", 0.0, committed_step=7), last_term=1, was_member=True,
                           last_rank=world1.rank_of("a"))
        survivor.start()
        assert survivor.done.wait(10) and spare.done.wait(10)
        assert survivor.error is None and spare.error is None
        assert survivor.world == spare.world
        assert spare.world.term == 2 and spare.world.members == ("a", "s")  # the member holding state is rank 0
        assert spare.world.needs_sync  # the spare receives rank 0's state
    finally:
        election.set_outcome("done")  # releases any thread still waiting
        for t in [*first, survivor]:
            if t is not None and t.ident is not None:
                t.join(timeout=10)


def test_the_embedded_cluster_has_room_for_every_worker_and_spare(monkeypatch):
    import os
    from types import SimpleNamespace

    from elastictrain.runtime import cluster
    from elastictrain.trainer import ElasticTrainer

    asked = []
    monkeypatch.setattr(cluster, "ensure_ray", lambda cpus: asked.append(cpus) and False)  # starts nothing
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    trainer = ElasticTrainer(lambda ctx: None, scaling=ScalingConfig(max_workers=2, spares=2),
                             batch=BatchConfig(global_batch_size=8))
    monkeypatch.setattr(trainer, "_driver", lambda: SimpleNamespace(run=lambda: "result"))
    assert trainer.fit() == "result"
    assert asked == [5]  # 2 workers + 2 spares, a CPU each, and one for the driver's helpers
