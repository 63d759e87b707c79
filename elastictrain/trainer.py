"""`ElasticTrainer.fit()`: the driver side of a run.

The driver starts worker actors, keeps the pool full, tells the workers about
deaths Ray reports (so elections need not wait for a heartbeat to lapse), kills
workers whose heartbeat lapsed (a hung process), asks workers on draining nodes
to leave, and gathers reports into a `Result`. Elections, rebuilds and state
hand-over happen among the workers.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.errors import TrainingFailed
from elastictrain.runtime.runlog import RunLog

@dataclass
class Result:
    """What a finished run returns.

    Attributes:
        metrics: rank 0's last report of the highest step reported: the committed end of the run,
            whatever rebuild happened near it (a new rank 0 resends reports its predecessor died with).
        steps: committed optimizer steps at the end (the final `state.step`).
        checkpoint_uri: where checkpoints went, or None.
        events: failures, rebuilds, resizes, preemptions, checkpoint fallbacks, in time order.
        history: rank 0's reports, one step after another; a step computed again keeps only the
            reports of its last computation. A read-only sequence of dicts, stored column-wise (a report
            of a few numbers costs tens of bytes); `list(result.history)` gives a plain list.
        commit_spans: (term, first step, last step) each term committed.
    """

    metrics: dict
    steps: int
    checkpoint_uri: Optional[str]
    events: list[dict]
    history: Sequence[dict] = field(default_factory=list)
    commit_spans: list[tuple[int, int, int]] = field(default_factory=list)
    steps_lost_in_flight: int = 0
    """Steps begun but not committed when their world changed, so computed again (work lost, no step applied twice)."""

    @property
    def commits(self) -> list[tuple[int, int]]:
        """(term, step) for every step each term committed."""
        from elastictrain.runtime.runlog import expand_commits

        return list(expand_commits(self.commit_spans))

    @property
    def recoveries(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "recovered"]

    @property
    def steps_redone(self) -> int:
        """Committed steps that had to be computed again after a failure (every replica of them was lost).

        A step lost in flight, begun and not committed, is not counted here but in `steps_lost_in_flight`.
        """
        from elastictrain.runtime.runlog import count_redone

        return count_redone(self.commit_spans)

    @property
    def failures(self) -> int:
        return sum(1 for e in self.events if e["kind"] == "worker_lost")


class RunView:
    """What a callback sees of a run in progress, and the faults it may inject (local clusters)."""

    def __init__(self, driver: "_Driver") -> None:
        self._driver = driver
        self._faults = 0

    @property
    def step(self) -> int:
        """The newest committed step (-1 before the first)."""
        return self._driver.log.newest_step

    @property
    def term(self) -> int:
        return self._driver.log.newest_term

    def members(self) -> dict[str, dict]:
        """Members of the newest world: id -> {rank, term, leader, pid, node_id}."""
        return {m: dict(info) for m, info in self._driver.log.world_members.items()}

    def events(self) -> list[dict]:
        """Every event so far, in arrival order."""
        return list(self._driver.log.events)

    def leader(self) -> Optional[str]:
        for member, info in self._driver.log.world_members.items():
            if info.get("leader"):
                return member
        return None

    def signal(self, member_id: str, sig: int = signal.SIGKILL) -> float:
        """Send `sig` to a member's process; returns the wall time it was sent (see `note_fault`)."""
        pid = self._driver.log.world_members[member_id]["pid"]
        now = time.time()
        os.kill(pid, sig)
        self.note_fault(member_id, signal=int(sig), time=now)
        return now

    def note_fault(self, member_id: str, **facts: Any) -> None:
        """Record a fault injected on `member_id` (a signal, a node removed or drained): a `fault_injected`
        event, and a count in the run's store (`faults/<n>`) where a worker's loop can wait for it
        (`elastictrain.ops.chaos.hold_until_faults`) instead of racing it with a step count."""
        self._faults += 1
        self._driver.election.store.put(f"faults/{self._faults:06d}", member_id.encode())
        self._driver.record({"kind": "fault_injected", "time": time.time(), "member": member_id, **facts})


class Callback(Protocol):
    """Called on the driver's thread. `on_progress` when steps commit and every quarter second;
    `on_event(view, event)`, if the callback has it, once for each event as it arrives."""

    def on_progress(self, view: RunView) -> None: ...


def actor_options(scaling: ScalingConfig) -> dict[str, Any]:
    """Ray actor options of one worker: its CPUs, GPUs (one with `use_gpu`, unless
    `resources_per_worker` names another amount), custom resources and node labels."""
    resources = dict(scaling.resources_per_worker)
    gpus = resources.pop("GPU", 1.0 if scaling.use_gpu else 0.0)
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0), "num_gpus": gpus}
    if resources:
        options["resources"] = resources
    if scaling.label_selector:
        options["label_selector"] = dict(scaling.label_selector)
    return options


class ElasticTrainer:
    """Runs `train_fn(ctx)` on elastic Ray workers until it finishes.

    Args:
        train_fn: the training loop, written once as if nothing fails.
        scaling: how many workers, with which resources, where.
        batch: the global batch, the same at every world size.
        checkpoint: where and how often to save; a URI holding checkpoints is resumed.
        failure: detection timeouts and the failure budget.
        run: name, seed, progress output.
        callbacks: objects with `on_progress(view)`, called on the driver's thread when steps
            commit and every quarter second while the run waits, and optionally
            `on_event(view, event)`, called for each event as it arrives.

    >>> result = ElasticTrainer(train_fn, scaling=ScalingConfig(min_workers=2, max_workers=3)).fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        train_fn: Callable[..., Any],
        *,
        scaling: Optional[ScalingConfig] = None,
        batch: Optional[BatchConfig] = None,
        checkpoint: Optional[CheckpointConfig] = None,
        failure: Optional[FailureConfig] = None,
        run: Optional[RunConfig] = None,
        callbacks: Optional[list] = None,
    ) -> None:
        if not callable(train_fn):
            raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
        self.train_fn = train_fn
        self.scaling = scaling or ScalingConfig()
        self.batch = batch or BatchConfig()
        self.checkpoint = checkpoint or CheckpointConfig()
        self.failure = failure or FailureConfig()
        self.run = run or RunConfig()
        self.callbacks = list(callbacks or [])
        if self.batch.global_batch_size < self.scaling.max_workers:
            raise ValueError(
                f"global_batch_size={self.batch.global_batch_size} is smaller than max_workers="
                f"{self.scaling.max_workers}, so a full world would leave some worker no sample: raise "
                f"global_batch_size to at least {self.scaling.max_workers} or lower max_workers"
            )

    def fit(self) -> Result:
        """Train to the end; returns the Result.

        Raises:
            TrainingFailed: train_fn raised, too many workers were lost, or too few
                were alive for longer than `failure.below_min_timeout_s`.
        """
        import ray

        from elastictrain.runtime.cluster import ensure_ray

        # Room for every worker plus the driver's helpers, even on a small machine.
        cpus = max(os.cpu_count() or 1, int(self.scaling.max_workers * self.scaling.resources_per_worker.get("CPU", 1)) + 1)
        started_ray = ensure_ray(cpus)
        try:
            return _Driver(self).run()
        finally:
            if started_ray:
                ray.shutdown()


class _Driver:
    """The driver loop of one fit(); lives only for its duration."""

    POLL_S = 0.02

    def __init__(self, trainer: ElasticTrainer) -> None:
        import ray

        from elastictrain.election.election import Election
        from elastictrain.election.ray_store import RayKVStore
        from elastictrain.runtime.controller import PoolController
        from elastictrain.runtime.hub import Hub
        from elastictrain.runtime.spec import RunSpec

        self.ray = ray
        self.trainer = trainer
        run_id = trainer.run.name or uuid.uuid4().hex[:12]
        self.spec = RunSpec(
            run_id=run_id,
            namespace=f"elastictrain/{run_id}/{uuid.uuid4().hex[:8]}",
            scaling=trainer.scaling,
            batch=trainer.batch,
            checkpoint=trainer.checkpoint,
            failure=trainer.failure,
            run=trainer.run,
        )
        self.election = Election(RayKVStore(self.spec.namespace))
        # The hub lives with the driver: a worker node that vanishes must not take it along.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.hub = Hub.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        self.pool = PoolController(trainer.scaling.max_workers, trainer.failure.max_failures)
        self.actors: dict[str, Any] = {}
        self.refs: dict[Any, str] = {}
        self.log = RunLog()
        self.view = RunView(self)
        self._spawned = 0
        self._last_progress = 0.0
        self._returns: dict[str, dict] = {}
        self._killed: set[str] = set()  # members killed for a lapsed heartbeat or a hang

    def record(self, event: dict) -> None:
        self._ingest([event])

    # --- actors ------------------------------------------------------------------------

    def _spawn(self, count: int) -> None:
        from elastictrain.runtime.worker import WorkerActor

        options = actor_options(self.spec.scaling)
        for _ in range(count):
            self._spawned += 1
            member_id = f"w{self._spawned:03d}-{uuid.uuid4().hex[:6]}"
            actor = WorkerActor.options(**options).remote(member_id, self.spec, self.hub)
            self.actors[member_id] = actor
            self.refs[actor.run.remote(self.trainer.train_fn)] = member_id
            self.pool.spawned(member_id)
            self.record({"kind": "worker_started", "time": time.time(), "member": member_id})

    def _kill(self, member_id: str) -> None:
        actor = self.actors.get(member_id)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> Result:
        ray = self.ray
        self._spawn(self.pool.start().spawn)
        failure: Optional[str] = None
        next_pull = next_health = 0.0
        ended_at: Optional[float] = None
        # Once the run is over, workers return on their own (the leader after its final
        # save); only a hung one is still running after this long.
        end_grace = self.spec.failure.rendezvous_timeout_s + self.spec.failure.heartbeat_timeout_s
        try:
            while self.refs:
                ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=self.POLL_S)
                for ref in ready:
                    decision = self._on_return(ref)
                    if decision.fail:
                        failure = failure or decision.fail
                    elif decision.spawn > 0:
                        self._spawn(decision.spawn)
                now = time.monotonic()
                if now >= next_pull:
                    next_pull = now + 0.1
                    self._ingest(ray.get(self.hub.pull.remote()))
                if now >= next_health:
                    next_health = now + 0.25
                    self._check_health()
                    self._notify_callbacks()
                outcome = self.election.outcome()
                if failure is None and outcome is not None and outcome.startswith("failed:"):
                    failure = outcome.removeprefix("failed:")
                if failure is not None:
                    self.election.set_outcome(f"failed:{failure}")
                    break
                if ended_at is None and (outcome == "done" or self.pool.ended):
                    ended_at = now
                if ended_at is not None and now - ended_at > end_grace:
                    self.record({"kind": "stragglers_killed", "time": time.time(), "members": sorted(self.refs.values())})
                    break
            self._ingest(ray.get(self.hub.pull.remote()))
        finally:
            # Every actor this run created, finished ones too: each holds its resources until killed.
            for member_id in list(self.actors):
                self._kill(member_id)
            self._kill_hub()
            where = self._failure_traceback() if failure is not None else None
            self._clear_election()
        if failure is not None:
            raise TrainingFailed(f"run {self.spec.run_id} failed: {failure}", cause=where)
        return self._result()

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
            self.record({"kind": "cleanup_failed", "time": time.time(), "reason": f"{type(exc).__name__}: {exc}"})

    def _kill_hub(self) -> None:
        try:
            self.ray.kill(self.hub)
        except Exception:  # noqa: BLE001
            pass

    def _on_return(self, ref):
        from elastictrain.runtime.controller import Decision

        member_id = self.refs.pop(ref)
        try:
            out = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, TrainingFailed):
                self.record({"kind": "error", "time": time.time(), "member": member_id, "reason": cause.reason})
                self.pool.active.discard(member_id)
                return Decision(fail=cause.reason)
            return self._lost(member_id, f"{type(exc).__name__}")
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as exc:
            return self._lost(member_id, type(exc).__name__)
        self._returns[member_id] = out
        self._kill(member_id)  # its run is over; free its resources for a replacement now
        if out["status"] == "left":
            self.record({"kind": "worker_left", "time": time.time(), "member": member_id, "step": out.get("step")})
            return self.pool.left(member_id)
        return self.pool.returned(member_id, out["status"])

    def _lost(self, member_id: str, reason: str):
        self.election.mark_dead(member_id)
        self.record({"kind": "worker_lost", "time": time.time(), "member": member_id, "reason": reason})
        self.log.world_members.pop(member_id, None)
        return self.pool.lost(member_id)

    def _check_health(self) -> None:
        """Kill members whose heartbeat lapsed (hung, SIGSTOPped) or whose training thread stopped making
        progress while its heartbeat lives (hung in user code); ask members on draining nodes to leave.

        Judged on this process's monotonic clock: when each member's beat and progress last changed here.
        """
        from elastictrain.election.heartbeat import is_hung

        now = time.monotonic()
        failure = self.spec.failure
        active = [m for m in self.election.members() if m.id in self.pool.active]
        for member in active:
            live = self.election.liveness(member.id, now)
            if live.dead or live.heartbeat is None:
                continue
            if member.id in self._killed:
                continue  # killed already; its death reaches the loop as a lost worker
            if now - live.heartbeat > failure.heartbeat_timeout_s:
                self.record({"kind": "heartbeat_lapsed", "time": time.time(), "member": member.id})
                self._killed.add(member.id)
                self._kill(member.id)
            elif is_hung(live.seen, now, failure.hang_timeout_s):
                self.record({"kind": "hang_detected", "time": time.time(), "member": member.id,
                             "no_progress_s": now - live.seen.progress_at})
                self._killed.add(member.id)
                self._kill(member.id)
        draining = _draining_nodes()
        if draining:
            for member in active:
                if member.node_id in draining:
                    if self.election.store.put_if_absent(f"leave/{member.id}", b"drain"):
                        self.record({"kind": "node_draining", "time": time.time(), "member": member.id,
                                     "node": member.node_id})

    def _ingest(self, records: list[dict]) -> None:
        before = self.log.newest_step
        for rec in records:
            event = self.log.add(rec)
            if event is not None:
                for callback in self.trainer.callbacks:
                    on_event = getattr(callback, "on_event", None)
                    if on_event is not None:
                        on_event(self.view, event)
        if self.log.newest_step > before:
            self._notify_callbacks()
            self._print_progress()

    def _notify_callbacks(self) -> None:
        for callback in self.trainer.callbacks:
            callback.on_progress(self.view)

    def _print_progress(self) -> None:
        if not self.spec.run.progress or time.monotonic() - self._last_progress < 1.0:
            return
        self._last_progress = time.monotonic()
        metrics = self.log.final_metrics()
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                         if isinstance(v, float) and k not in ("time", "t", "step", "term"))
        lost = sum(1 for r in self.log.events if r.get("kind") == "worker_lost")
        print(f"[elastictrain] step {self.log.newest_step + 1} term {self.log.newest_term} "
              f"workers {len(self.log.world_members)} lost {lost} {shown}", file=sys.stderr, flush=True)

    def _result(self) -> Result:
        steps = max((out.get("step", -1) for out in self._returns.values() if out["status"] == "finished"), default=-1)
        return Result(
            metrics=self.log.final_metrics(),
            steps=steps,
            checkpoint_uri=self.spec.checkpoint.uri,
            events=self.log.all_events(),
            history=self.log.history(),
            commit_spans=self.log.commit_spans(),
            steps_lost_in_flight=self.log.steps_lost_in_flight(),
        )


def _draining_nodes() -> set[str]:
    try:
        from ray._private.state import state

        return set(state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - not every Ray version has it; draining then goes unseen
        return set()
