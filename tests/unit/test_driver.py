"""The driver stepped by hand: a fake cluster and an in-memory election, no Ray."""

from __future__ import annotations

import pytest

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.heartbeat import Beat
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import Member
from elastictrain.errors import TrainingFailed
from elastictrain.events import event
from elastictrain.runtime.driver import Driver, WorkerExit
from elastictrain.runtime.policy import Decision, FailurePolicy, PlacementPolicy
from elastictrain.runtime.spec import RunSpec


class FakeWorkers:
    """Workers that do what a test says: exit, send records, sit on a draining node."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.options: list[dict] = []
        self.killed: list[str] = []
        self.pending_exits: list[WorkerExit] = []
        self.records: list[dict] = []
        self.draining: set[str] = set()
        self.gone: set[str] = set()  # exits the driver has been told of
        self.closed = False

    def start(self, member_id, options):
        self.started.append(member_id)
        self.options.append(options)

    def kill(self, member_id):
        self.killed.append(member_id)

    def exits(self, timeout_s):
        out, self.pending_exits = self.pending_exits, []
        self.gone.update(e.member for e in out)
        return out

    def running(self):
        exited = set(self.killed) | self.gone | {e.member for e in self.pending_exits}
        return [m for m in self.started if m not in exited]

    def pull(self):
        out, self.records = self.records, []
        return out

    def draining_nodes(self):
        return set(self.draining)

    def close(self):
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _driver(max_workers=2, max_failures=1, **failure):
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(min_workers=1, max_workers=max_workers),
                   batch=BatchConfig(global_batch_size=8), checkpoint=CheckpointConfig(),
                   failure=FailureConfig(max_failures=max_failures, **failure), run=RunConfig(progress=False))
    workers, clock = FakeWorkers(), Clock()
    driver = Driver(spec, workers, Election(MemoryStore()), clock=clock)
    return driver, workers, clock


def _kinds(driver):
    return [e["kind"] for e in driver.log.events]


def _tick(driver, clock, seconds=1.0):
    clock.now += seconds
    return driver.step()


def test_the_pool_is_started_full_and_a_lost_worker_is_replaced():
    driver, workers, clock = _driver(max_workers=2, max_failures=1)
    driver.start()
    assert len(workers.started) == 2 and _kinds(driver) == ["worker_started"] * 2
    assert workers.options == [driver.placement.actor_options()] * 2  # placed as the policy says
    first = workers.started[0]
    workers.pending_exits.append(WorkerExit(first, lost="RayActorError"))
    assert _tick(driver, clock)
    assert len(workers.started) == 3 and first in driver.election.deaths()
    assert _kinds(driver)[-2:] == ["worker_lost", "worker_started"]


def test_losing_more_workers_than_max_failures_fails_the_run_naming_the_cause():
    driver, workers, clock = _driver(max_workers=2, max_failures=1)
    driver.start()
    workers.pending_exits.append(WorkerExit(workers.started[0], lost="RayActorError"))
    assert _tick(driver, clock)
    workers.pending_exits.append(WorkerExit(workers.started[1], lost="RayActorError"))
    assert not _tick(driver, clock)
    assert "2 workers lost, more than max_failures=1" in driver.failure
    assert driver.election.outcome() == f"failed:{driver.failure}"  # every worker learns it


def test_a_user_error_on_a_worker_fails_the_run_and_is_not_refilled():
    driver, workers, clock = _driver()
    driver.start()
    workers.pending_exits.append(WorkerExit(workers.started[0], error="train_fn raised ValueError: bad batch"))
    assert not _tick(driver, clock)
    assert driver.failure == "train_fn raised ValueError: bad batch" and len(workers.started) == 2
    assert _kinds(driver)[-1] == "error"


def test_a_finished_run_stops_refilling_and_ends_when_every_worker_returned():
    driver, workers, clock = _driver(max_workers=2)
    driver.start()
    a, b = workers.started
    workers.records += [event("commit", term=1, step=s, rank=0) for s in range(3)]
    workers.pending_exits.append(WorkerExit(a, status="finished", step=3))
    assert _tick(driver, clock)
    workers.pending_exits.append(WorkerExit(b, status="ended", step=3))
    assert not _tick(driver, clock)
    assert driver.failure is None and len(workers.started) == 2 and workers.killed == [a, b]
    result = driver.result()
    assert result.steps == 3 and result.commit_spans == [(1, 0, 2)]


def test_a_finished_run_does_not_wait_for_workers_outside_its_last_world():
    driver, workers, clock = _driver(max_workers=2)
    driver.start()
    a, b = workers.started
    workers.started.append("spare")  # a warm spare, or capacity still starting: never in a world
    workers.records += [event("joined", term=1, rank=r, world_size=2, leader=r == 0, member=m)
                        for r, m in enumerate((a, b))]
    workers.records += [event("commit", term=1, step=s, rank=0) for s in range(3)]
    workers.pending_exits.append(WorkerExit(a, status="finished", step=3))
    assert _tick(driver, clock)  # b, a member of the last world, still runs
    workers.pending_exits.append(WorkerExit(b, status="ended", step=3))
    assert not _tick(driver, clock)  # only the spare runs: the run is over, close() stops it
    assert workers.running() == ["spare"] and driver.failure is None
    driver.close()
    assert workers.closed


def test_a_finished_run_waits_to_see_the_loss_of_a_member_of_an_earlier_world():
    driver, workers, clock = _driver(max_workers=2)
    driver.start()
    a, b = workers.started
    workers.records += [event("joined", term=1, rank=r, world_size=2, leader=r == 0, member=m)
                        for r, m in enumerate((a, b))]
    workers.records.append(event("joined", term=2, rank=0, world_size=1, leader=True, member=a))  # b's node went
    workers.pending_exits.append(WorkerExit(a, status="finished", step=3))
    assert _tick(driver, clock)  # b is not in the last world, but it was in one: its end is still to be seen
    workers.pending_exits.append(WorkerExit(b, lost="ActorDiedError"))
    assert not _tick(driver, clock)
    assert "worker_lost" in _kinds(driver)


def test_a_worker_that_leaves_is_replaced_without_counting_a_failure():
    driver, workers, clock = _driver(max_workers=2, max_failures=0)
    driver.start()
    workers.pending_exits.append(WorkerExit(workers.started[0], status="left", step=5))
    assert _tick(driver, clock)
    assert driver.failure is None and len(workers.started) == 3 and _kinds(driver)[-2:] == ["worker_left", "worker_started"]


def test_a_lapsed_heartbeat_gets_its_worker_killed_once():
    driver, workers, clock = _driver(heartbeat_timeout_s=3.0)
    driver.start()
    a, b = workers.started
    for m in (a, b):
        driver.election.register(Member(m, joined_at=0.0))
    driver.election.heartbeat(a, Beat(seq=1, progress=1, in_loop=False))
    driver.election.heartbeat(b, Beat(seq=1, progress=1, in_loop=False))
    assert _tick(driver, clock)  # both beats seen now
    driver.election.heartbeat(b, Beat(seq=2, progress=2, in_loop=False))
    clock.now += 2.0
    assert _tick(driver, clock, 2.0)  # 4 s since a's beat changed, b beat again
    assert workers.killed == [a] and "heartbeat_lapsed" in _kinds(driver)
    # Dead for its peers at once, and its slot refilled, before any exit confirms the kill: a silent machine
    # confirms nothing until the cluster gives up on its node.
    assert driver.election.deaths() == {a} and not workers.pending_exits
    assert len(workers.started) == 3 and _kinds(driver)[-1] == "worker_started"
    assert _tick(driver, clock, 1.0) and workers.killed == [a]  # not killed twice


class SilentKills(FakeWorkers):
    """A killed worker on a silent node: it runs on, as far as the cluster knows, until its node is given up."""

    def running(self):
        return [m for m in self.started if m not in self.gone]


def test_a_lapsed_worker_whose_exit_never_comes_neither_holds_the_end_nor_is_replaced_twice():
    spec = _driver()[0].spec
    workers, clock = SilentKills(), Clock()
    driver = Driver(spec, workers, Election(MemoryStore()), clock=clock)
    driver.start()
    a, b = workers.started
    workers.records += [event("joined", term=1, rank=r, world_size=2, leader=r == 0, member=m)
                        for r, m in enumerate((a, b))]
    for m in (a, b):
        driver.election.register(Member(m, joined_at=0.0))
        driver.election.heartbeat(m, Beat(seq=1, progress=1, in_loop=False))
    assert _tick(driver, clock)
    driver.election.heartbeat(a, Beat(seq=2, progress=2, in_loop=False))
    assert _tick(driver, clock, 4.0)  # b's beat is 4 s old: killed, never confirmed
    replacement = workers.started[2]
    assert workers.killed == [b] and len(workers.started) == 3
    workers.records.append(event("joined", term=2, rank=0, world_size=2, leader=True, member=a))
    workers.records.append(event("joined", term=2, rank=1, world_size=2, leader=False, member=replacement))
    workers.pending_exits += [WorkerExit(a, status="finished", step=3), WorkerExit(replacement, status="ended", step=3)]
    assert not _tick(driver, clock)  # over, though b never exited
    assert len(workers.started) == 3 and driver.failure is None


def test_a_training_thread_without_progress_is_a_hang_while_its_heartbeat_lives():
    driver, workers, clock = _driver(heartbeat_timeout_s=3.0, collective_timeout_s=1.0, hang_timeout_s=5.0)
    driver.start()
    a = workers.started[0]
    driver.election.register(Member(a, joined_at=0.0))
    for seq in range(1, 9):  # beats keep coming, progress stays at 7 inside the loop
        driver.election.heartbeat(a, Beat(seq=seq, progress=7, in_loop=True))
        assert _tick(driver, clock, 1.0)
    assert workers.killed == [a]
    hang = next(e for e in driver.log.events if e["kind"] == "hang_detected")
    assert hang["member"] == a and hang["no_progress_s"] > 5.0
    assert driver.log.events[-1]["kind"] == "worker_started"  # its replacement, at once


def test_workers_on_a_draining_node_are_asked_to_leave_once():
    driver, workers, clock = _driver()
    driver.start()
    a, b = workers.started
    driver.election.register(Member(a, joined_at=0.0, node_id="n1"))
    driver.election.register(Member(b, joined_at=0.0, node_id="n2"))
    workers.draining = {"n1"}
    assert _tick(driver, clock) and _tick(driver, clock)
    assert driver.election.asked_to_leave(a) and not driver.election.asked_to_leave(b)
    assert _kinds(driver).count("node_draining") == 1


def test_stragglers_are_killed_after_the_grace_once_the_run_is_done():
    driver, workers, clock = _driver(rendezvous_timeout_s=5.0, heartbeat_timeout_s=3.0)
    driver.start()
    driver.election.set_outcome("done")
    assert _tick(driver, clock, 1.0)
    assert not _tick(driver, clock, 9.0)
    assert _kinds(driver)[-1] == "stragglers_killed"


def test_run_closes_the_workers_and_raises_the_failure():
    driver, workers, clock = _driver(max_failures=0)
    workers_started = workers.started

    def lose_first(timeout_s):
        out = [WorkerExit(workers_started[0], lost="WorkerCrashedError")] if workers_started else []
        workers.exits = lambda timeout_s: []
        return out

    workers.exits = lose_first
    with pytest.raises(TrainingFailed, match="1 workers lost, more than max_failures=0"):
        driver.run()
    assert workers.closed and driver.election.store.keys("") == []  # the run's keys are cleared


def test_policies_decide_without_a_driver():
    placement, failures = PlacementPolicy(ScalingConfig(max_workers=3)), FailurePolicy(max_failures=1)
    assert placement.start() == Decision(spawn=3)
    for m in "abc":
        placement.spawned(m)
    assert failures.on_lost("a") == Decision() and placement.gone("a") == Decision(spawn=1)
    assert failures.on_lost("b").fail is not None
    assert placement.returned("c", "finished") == Decision() and placement.ended
    assert placement.gone("b") == Decision()  # the run is over: no replacement


@pytest.mark.parametrize("value", [b"{}", b"\xff\x00", b'{"id": "x", "joined_at": 0}', b"done"])
def test_forged_records_in_the_store_never_crash_the_driver(value):
    driver, workers, clock = _driver()
    driver.start()
    a, _ = workers.started
    driver.election.register(Member(a, joined_at=0.0))
    for key in ("member/evil", "hb/evil", f"hb/{a}", "deaths", f"dead/{a}", "outcome", "leader/999999999999"):
        driver.election.store.put(key, value)
    for _ in range(3):
        assert _tick(driver, clock, 0.3)  # the forged outcome ends nothing; no forged death is a loss
    rejected = [e["key"] for e in driver.log.events if e["kind"] == "record_rejected"]
    assert {"member/evil", "outcome"} <= set(rejected) and len(rejected) == len(set(rejected))
    assert driver.failure is None and "worker_lost" not in _kinds(driver)


def test_the_driver_backs_bids_with_the_newest_step_workers_reported():
    driver, workers, clock = _driver()
    driver.start()
    workers.records = [event("commit", term=1, step=6, rank=1), event("world_changed", term=1, step=4, reason="x")]
    _tick(driver, clock)
    assert driver.election.backed_step() == 7  # a commit of step 6 leaves the state at step 7
    workers.records = [event("world_changed", term=1, step=9, reason="x")]
    _tick(driver, clock)
    assert driver.election.backed_step() == 9
