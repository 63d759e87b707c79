"""The driver of one `fit()`, steppable: each `step()` observes the workers once and acts.

The driver starts workers, keeps the pool full, tells the workers about deaths it sees (so elections
need not wait for a heartbeat to lapse), kills workers whose heartbeat lapsed or whose training
stopped making progress, asks workers on draining nodes to leave, and folds their records into the
run log a `Result` is read from. Elections, rebuilds and state hand-over happen among the workers.

What it decides comes from its policies (`runtime/policy.py`) and from `judge_health`; what it acts
on goes through a `Workers` backend: Ray actors in a run (`runtime/ray_workers.py`), a fake in the
driver's unit tests, which step it by hand.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

from elastictrain.config import FailureConfig
from elastictrain.election.election import Election
from elastictrain.election.heartbeat import is_hung
from elastictrain.election.term import NO_STATE, Member
from elastictrain.errors import TrainingFailed
from elastictrain.events import Event, event
from elastictrain.fleet.progress import ProgressDisplay
from elastictrain.runtime.policy import Decision, FailurePolicy, PlacementPolicy
from elastictrain.runtime.records import accept_records
from elastictrain.runtime.results import Result, RunView
from elastictrain.runtime.runlog import RunLog
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.spread_control import SpreadControl


@dataclass(frozen=True)
class WorkerExit:
    """How a worker's run ended, as the driver saw it.

    Attributes:
        member: the worker.
        status: what its run returned ("finished", "ended", "left"), None when it did not return.
        step: its committed step when it returned.
        error: the reason of the user error that ended the run on it, if any.
        lost: why its process is gone (the exception's type name) when it died or was killed.
    """

    member: str
    status: Optional[str] = None
    step: Optional[int] = None
    error: Optional[str] = None
    lost: Optional[str] = None


class Workers(Protocol):
    """What the driver needs of the cluster."""

    def start(self, member_id: str, options: dict) -> None:
        """Start a worker process that runs the user's loop as `member_id`, placed with `options`
        (the placement policy's Ray actor options)."""

    def kill(self, member_id: str) -> None:
        """Kill a worker's process (nothing if it is gone)."""

    def exits(self, timeout_s: float) -> list[WorkerExit]:
        """Workers whose run ended since the last call, waiting up to `timeout_s` for one."""

    def running(self) -> list[str]:
        """Workers started and not yet exited."""

    def pull(self) -> list[Event]:
        """Records workers sent since the last pull."""

    def draining_nodes(self) -> set[str]:
        """Nodes the cluster is draining (their workers are asked to leave)."""

    def close(self) -> None:
        """Kill every worker and helper this run started."""


@dataclass(frozen=True)
class Kill:
    """A health decision: kill `member`, and say why with `event`."""

    member: str
    event: Event


def judge_health(
    members: Iterable[Member], election: Election, now: float, failure: FailureConfig, skip: set[str],
) -> list[Kill]:
    """Members to kill: a lapsed heartbeat (hung or stopped process), or a training thread with no
    progress for `hang_timeout_s` while its heartbeat lives (hung in user code). Judged on this
    process's monotonic clock (`now`): when each member's beat and progress last changed here."""
    kills = []
    for member in members:
        if member.id in skip:
            continue
        live = election.liveness(member.id, now)
        if live.dead or live.heartbeat is None:
            continue
        if now - live.heartbeat > failure.heartbeat_timeout_s:
            kills.append(Kill(member.id, event("heartbeat_lapsed", member=member.id)))
        elif is_hung(live.seen, now, failure.hang_timeout_s):
            kills.append(Kill(member.id, event("hang_detected", member=member.id,
                                               no_progress_s=now - live.seen.progress_at)))
    return kills


class Driver:
    """The driver of one run. `run()` steps it to the end; tests call `start()` and `step()` themselves.

    Args:
        spec: the run's configs.
        workers: the cluster backend.
        election: the run's election (its store is where workers register and beat).
        callbacks: `on_progress(view)` / `on_event(view, event)` objects, called on this thread.
        clock: monotonic seconds (the health checks and pacing).
    """

    POLL_S = 0.02
    PULL_EVERY_S = 0.1
    HEALTH_EVERY_S = 0.25

    def __init__(
        self,
        spec: RunSpec,
        workers: Workers,
        election: Election,
        callbacks: Iterable = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.workers = workers
        self.election = election
        self.callbacks = list(callbacks)
        self.progress = (ProgressDisplay(spec.batch.global_batch_size, total=spec.run.progress_total, clock=clock)
                         if spec.run.progress else None)
        if self.progress is not None:
            self.callbacks.append(self.progress)
        self.clock = clock
        self.placement = PlacementPolicy(spec.scaling)
        self.spread = SpreadControl(self) if spec.scaling.spread_by else None
        self.failures = FailurePolicy(spec.failure.max_failures)
        self.log = RunLog()
        self.view = RunView(self)
        self.failure: Optional[str] = None
        self._spawned = 0
        self._returns: dict[str, WorkerExit] = {}
        self._killed: set[str] = set()  # members killed for a lapsed heartbeat or a hang
        self._next_pull = self._next_health = 0.0
        self._ended_at: Optional[float] = None
        # Once the run is over, workers return on their own (the leader after its final
        # save); only a hung one is still running after this long.
        self._end_grace = spec.failure.rendezvous_timeout_s + spec.failure.heartbeat_timeout_s
        self._backed = NO_STATE  # the newest committed step workers reported, published to back their bids
        self._entered: set[str] = set()  # workers that joined any world of the run
        if election.on_reject is None:
            election.on_reject = self.record
        from elastictrain.fleet.report_log import open_event_log

        self.event_log, self.events_uri = open_event_log(
            spec, lambda reason: self.record(event("event_log_failed", reason=reason)))

    # --- the loop ------------------------------------------------------------------

    def run(self) -> Result:
        """Start the workers and step until the run ends; returns the Result.

        Raises:
            TrainingFailed: the run failed (the reason, and the worker's traceback for a user error).
        """
        self.start()
        try:
            while self.step():
                pass
            self._ingest_pulled()
        finally:
            where = self._failure_traceback() if self.failure is not None else None
            self.close()
            if self.event_log is not None:
                self.event_log.close()
        if self.failure is not None:
            raise TrainingFailed(f"run {self.spec.run_id} failed: {self.failure}", cause=where)
        return self.result()

    def start(self) -> None:
        self._act(self.placement.start())

    def step(self) -> bool:
        """Observe once and act: exits, records, health, the outcome. False when the run is over."""
        for ended in self.workers.exits(self.POLL_S):
            self._act(self._on_exit(ended))
        now = self.clock()
        if now >= self._next_pull:
            self._next_pull = now + self.PULL_EVERY_S
            self._ingest_pulled()
        if now >= self._next_health:
            self._next_health = now + self.HEALTH_EVERY_S
            self._check_health(now)
            if self.spread:
                self.spread.tick(now)
            self._notify_callbacks()
        if self.event_log is not None:
            self.event_log.maybe_flush()
        outcome = self.election.outcome()
        if self.failure is None and outcome is not None and outcome.startswith("failed:"):
            self.failure = outcome.removeprefix("failed:")
        if self.failure is not None:
            self.election.set_outcome(f"failed:{self.failure}")
            return False
        if self._ended_at is None and (outcome == "done" or self.placement.ended):
            self._ended_at = now
        if self._ended_at is not None and now - self._ended_at > self._end_grace:
            self.record(event("stragglers_killed", members=sorted(self.workers.running())))
            return False
        running = self.workers.running()
        if self._ended_at is not None and self._entered and not (set(running) - self._killed) & self._entered:
            # Whoever was ever in a world has returned, been seen lost or been killed (a silent node's worker
            # exits only when the cluster gives up on the node); the rest (warm spares, capacity still
            # starting) never held state: close() stops them rather than the run waiting for them.
            return False
        return bool(running)

    def close(self) -> None:
        """Kill every worker (finished ones hold their resources until killed); clear the run's keys."""
        self.workers.close()
        self._clear_election()
        if self.progress is not None:
            self.progress.close()

    def result(self) -> Result:
        steps = max((e.step for e in self._returns.values() if e.status == "finished" and e.step is not None),
                    default=-1)
        return Result(
            metrics=self.log.final_metrics(),
            steps=steps,
            checkpoint_uri=self.spec.checkpoint.uri,
            events=self.log.all_events(),
            history=self.log.history(),
            commit_spans=self.log.commit_spans(),
            steps_lost_in_flight=self.log.steps_lost_in_flight(),
            events_uri=self.events_uri if self.event_log is not None else None,
        )

    def record(self, record: Event) -> None:
        self._ingest([record])

    # --- decisions ---------------------------------------------------------------------

    def _act(self, decision: Decision) -> None:
        if decision.fail is not None:
            self.failure = self.failure or decision.fail
        targets = self.spread.targets(decision.spawn) if self.spread else [None] * decision.spawn
        for target in targets:
            self.start_worker(target)

    def start_worker(self, target=None) -> str:
        """Start one worker, placed by the policy (and by its spread `target`, if any); returns its id."""
        self._spawned += 1
        member_id = f"w{self._spawned:03d}-{uuid.uuid4().hex[:6]}"
        spread = target.selector(self.spec.scaling.spread_by) if target is not None else None
        self.workers.start(member_id, self.placement.actor_options(spread))
        self.placement.spawned(member_id)
        if self.spread:
            self.spread.started(member_id, target)
        self.record(event("worker_started", member=member_id))
        return member_id

    def _on_exit(self, ended: WorkerExit) -> Decision:
        member = ended.member
        if ended.error is not None:
            self.record(event("error", member=member, reason=ended.error))
            self.placement.failed(member)
            return self.failures.on_error(member, ended.error)
        if self.spread and self.spread.gone(member):  # stopped while pending, to start again relaxed
            self.election.mark_dead(member)
            return self.placement.gone(member)
        if ended.lost is not None:
            self.election.mark_dead(member)
            self.record(event("worker_lost", member=member, reason=ended.lost))
            self.log.world_members.pop(member, None)
            decision = self.failures.on_lost(member)
            refill = self.placement.gone(member)
            return decision if decision.fail is not None else refill
        self._returns[member] = ended
        self.workers.kill(member)  # its run is over; free its resources for a replacement now
        if ended.status == "left":
            self.record(event("worker_left", member=member, step=ended.step))
            return self.placement.gone(member)
        return self.placement.returned(member, ended.status or "")

    def _check_health(self, now: float) -> None:
        active = [m for m in self.election.members() if m.id in self.placement.active]
        for kill in judge_health(active, self.election, now, self.spec.failure, self._killed):
            self.record(kill.event)
            self._killed.add(kill.member)
            # Taken for dead now, not once the kill is confirmed: a silent machine (stopped, unreachable)
            # confirms nothing until the cluster gives up on its node, and its peers would wait on it in a
            # collective until then. Survivors who read the death leave their group and rebuild without it.
            self.election.mark_dead(kill.member)
            self.workers.kill(kill.member)  # its death reaches the loop as a lost worker
            # Its slot is refilled now too: on a silent node the exit comes only when the cluster gives up on it.
            self._act(self.placement.gone(kill.member))
        draining = self.workers.draining_nodes()
        if draining:
            for member in active:
                if member.node_id in draining and self.election.ask_to_leave(member.id):
                    self.record(event("node_draining", member=member.id, node=member.node_id))

    # --- records -------------------------------------------------------------------------

    def _ingest_pulled(self) -> None:
        """Fold in what workers sent, taking only plain records of known kinds (`records.accept_records`)."""
        kept, dropped = accept_records(self.workers.pull())
        self._ingest(kept if dropped is None else kept + [dropped])

    def _ingest(self, records: list[Event]) -> None:
        before = self.log.newest_step
        self._back_bids(records)
        self._entered.update(r["member"] for r in records if r.get("kind") == "joined" and isinstance(r.get("member"), str))
        for rec in records:
            if self.event_log is not None:
                self.event_log.add(rec)
            added = self.log.add(rec)
            if added is not None:
                for callback in self.callbacks:
                    on_event = getattr(callback, "on_event", None)
                    if on_event is not None:
                        on_event(self.view, added)
        if self.log.newest_step > before:
            self._notify_callbacks()

    def _back_bids(self, records: list[Event]) -> None:
        """Publish the newest committed step workers reported over their actor channel: a survivor reports its
        step (`world_changed`) before it bids it, and a leader counts a bid only up to this (or its own)."""
        backed = self._backed
        for rec in records:
            step, kind = rec.get("step"), rec.get("kind")
            if isinstance(step, int) and not isinstance(step, bool):
                if kind == "commit":
                    backed = max(backed, step + 1)  # a commit of step s leaves the state at step s + 1
                elif kind in ("world_changed", "restored_from_checkpoint", "left"):
                    backed = max(backed, step)
        if backed > self._backed:
            self._backed = backed
            self.election.back_step(backed)

    def _notify_callbacks(self) -> None:
        for callback in self.callbacks:
            callback.on_progress(self.view)

    # --- the end -------------------------------------------------------------------------

    def _failure_traceback(self) -> Optional[str]:
        """Where the user's code raised, as the worker's traceback (None when no user error ended the run)."""
        try:
            return self.election.outcome_detail()
        except Exception:  # noqa: BLE001 - the reason alone still says what failed
            return None

    def _clear_election(self) -> None:
        """Delete the run's keys from the cluster's KV store: a shared cluster keeps them otherwise."""
        store = self.election.store
        try:
            for key in store.keys(""):
                store.delete(key)
        except Exception as exc:  # noqa: BLE001 - the run is over either way
            self.record(event("cleanup_failed", reason=f"{type(exc).__name__}: {exc}"))
