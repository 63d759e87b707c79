"""One worker's life: join a world, run `train_fn`, rebuild on a world change, repeat.

The Ray actor (`worker.py`) is a thin shell around this; the runner talks to the
rest of the run only through the election store and an `emit` callback.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from elastictrain.election.election import Election
from elastictrain.election.heartbeat import Beat
from elastictrain.election.policy import should_grow
from elastictrain.election.term import NO_STATE, Member
from elastictrain.errors import LeaveWorld, StaleTerm, TrainingFailed, WorldChanged
from elastictrain.events import QUIET_KINDS, Event, event
from elastictrain.runtime.context import Context, _set_current
from elastictrain.election.topology import plan_topology
from elastictrain.runtime.keep import KeptObjects
from elastictrain.runtime.lineage import LineageBook, world_facts
from elastictrain.runtime.process_group import (
    GroupSockets,
    build_groups,
    destroy_group,
    init_group,
    is_collective_failure,
)
from elastictrain.runtime.network import plaintext_refusal
from elastictrain.runtime.rendezvous import Rendezvous, RunEnded
from elastictrain.runtime.rng import seed_everything
from elastictrain.runtime.rollback import CommitCopy
from elastictrain.runtime.session import TermSession
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState, StateLimits, agree_or_broadcast, take_rank0_state
from elastictrain.runtime.term_store import TermStore, prune_terms
from elastictrain.runtime.world import WorldInfo
from elastictrain.statetree import unflatten_state

MAX_REBUILDS_WITHOUT_PROGRESS = 20
GROW_CHECK_INTERVAL_S = 0.5
LEFT, WORLD_CHANGED, USER_ERROR = "left", "world_changed", "user_error"
REPORTS_KEPT = 1024
"""Reports every rank keeps of its last steps, for a new rank 0 to resend what a dead one never sent."""


def provenance(node: dict) -> dict[str, str]:
    """What a checkpoint's manifest records of the machine that wrote it: its node id, host and every
    label of its node (provider, region, zone, ... whatever the cluster set), as strings."""
    labels = {str(k): str(v) for k, v in (node.get("labels") or {}).items()}
    return {**labels, "node": str(node.get("node_id", "")), "host": str(node.get("host", ""))}


NODE_FACTS = ("provider", "region", "zone", "instance_type", "accelerator")
"""Node labels a `joined` event carries, for reports that attribute steps and hours to providers."""


def node_facts(node: dict) -> dict[str, str]:
    """The `NODE_FACTS` labels this node has, as strings."""
    labels = node.get("labels") or {}
    return {name: str(labels[name]) for name in NODE_FACTS if labels.get(name) not in (None, "")}


RECOVERY_PHASES = ("elect", "group", "reenter", "restore", "first_step")
"""The phases of a recovery after detection, in order, as the `recovered` event reports them."""


def recovery_phases(detected: float, published: float, marks: dict[str, float], committed: float) -> dict[str, float]:
    """Seconds each phase of a recovery took, from the failure's detection to the first commit: `elect`
    (a leader publishes the world), `group` (process groups formed), `reenter` (`train_fn` entered again
    up to `ctx.state`: objects built or kept, wrapped), `restore` (state carried over, agreed or received),
    `first_step` (the first step of the new world committed). They add up to the recovery; a phase whose
    end went unrecorded reads 0 and its time falls to the next one."""
    ends = [published, marks.get("grouped"), marks.get("reentered"), marks.get("restored"), committed]
    phases, last = {}, detected
    for name, end in zip(RECOVERY_PHASES, ends):
        end = last if end is None or end < last else end
        phases[name], last = end - last, end
    return phases


def state_bytes(state: ElasticState) -> int:
    """Bytes of the tensors of a state (what a broadcast of it carries, besides its small header)."""
    tensors, _ = state.flatten()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def classify_exit(exc: BaseException) -> str:
    """How an entry of `train_fn` that raised `exc` ended: `LEFT` (this member leaves at a boundary),
    `WORLD_CHANGED` (a planned rebuild, or a collective failed because a peer is gone), or
    `USER_ERROR` (anything else the user's code raised: the run fails)."""
    if isinstance(exc, LeaveWorld):
        return LEFT
    if isinstance(exc, WorldChanged) or is_collective_failure(exc):
        return WORLD_CHANGED
    return USER_ERROR


class Runner:
    """Runs `train_fn` on one worker across as many worlds as the run needs.

    Args:
        member_id: unique id of this worker in the run.
        train_fn: the user's function, called with a `Context` on every entry.
        spec: the run's configs.
        election: the run's election on its store.
        send: delivers a batch of report/event records to the driver.
        node: {"node_id", "host", "labels"} of this worker's machine.
        device: where the model lives.
        attestation: the signed identity this node's cloud gave (`fleet.attestation`), for manifests.
    """

    def __init__(
        self,
        member_id: str,
        train_fn: Callable[[Context], Any],
        spec: RunSpec,
        election: Election,
        send: Callable[[list[dict]], None],
        node: dict,
        device: torch.device,
        attestation: Optional[dict] = None,
    ) -> None:
        self.member_id = member_id
        self.attestation = attestation or {}
        self._lineage = LineageBook()  # the terms this member was in, for checkpoint lineage
        self.train_fn = train_fn
        self.spec = spec
        self.election = election
        self._send = send
        self.node = node
        self.device = device
        self.committed = NO_STATE
        self.detected_at: Optional[float] = None
        self.world: Optional[WorldInfo] = None
        self._live: Optional[ElasticState] = None
        self.kept = KeptObjects()  # ctx.keep: the user's objects, carried from one entry of train_fn to the next
        self._joined_at = time.time()
        self._buffer: list[dict] = []
        self._buffer_lock = threading.Lock()
        self._reports: deque[dict] = deque(maxlen=REPORTS_KEPT)
        self._was_rank0 = False
        self.in_flight: Optional[int] = None  # the step whose body runs now (set by Context.steps)
        self.progress = 0  # bumped by the training thread at every step, report and accumulate call
        self.in_loop = False  # inside ctx.steps and not in a runtime wait: the heartbeat says progress is due
        self._beats = 0
        self._leave = threading.Event()
        self._notice: Optional[dict] = None  # the first preemption notice (request_leave)
        self._grow = threading.Event()
        self._stop = threading.Event()
        self._first_commit_of_term = True
        self._marks: dict[str, float] = {}  # when this entry's recovery phases ended (`recovery_phases`)
        self._checkpoints = None
        self._last_saved_step: Optional[int] = None
        self._pending_save: Optional[tuple[int, int]] = None  # (term, step) of the save in flight
        self._save_owed = False  # a periodic save came due while the last one was still in flight
        self._group_sockets: Optional[GroupSockets] = None
        self._group_lock = threading.Lock()
        # What a lost step could change before its optimizer step, copied at each commit (runtime/rollback.py).
        self._at_commit: Optional[CommitCopy] = None
        self._stepped = False  # an optimizer of the state stepped since the last commit
        self._step_hooks: list = []
        self.rendezvous = Rendezvous(election, member_id, spec.rendezvous_policy(), self._open_store)

    # --- signals from outside ---------------------------------------------------

    @property
    def stopping(self) -> threading.Event:
        """Set when this worker's run is over (waits in the training thread end early)."""
        return self._stop

    def request_leave(self, source: str = "sigterm", notice_s: Optional[float] = None,
                      received: Optional[float] = None) -> None:
        """A preemption notice: leave at the next step boundary (after saving). The first notice's `source`
        ('sigterm', 'drain', 'aws', ...), warning length `notice_s` and wall time `received` go into the
        `preemption_notice` and `left` events."""
        if self._notice is None:
            self._notice = {"source": source, "notice_s": notice_s,
                            "received": time.time() if received is None else received}
        self._leave.set()

    def _notice_facts(self) -> dict:
        """The facts of the notice this member leaves for: source, notice_s, used_s (notice to now)."""
        n = self._notice
        if n is None:
            return {}
        return {"source": n["source"], "notice_s": n["notice_s"], "used_s": time.time() - n["received"]}

    def emit(self, record: Event) -> None:
        """Queue a record for the driver; an event (anything but metrics and commits) is sent at once."""
        record.setdefault("member", self.member_id)
        with self._buffer_lock:
            self._buffer.append(record)
        if record.get("kind") not in QUIET_KINDS:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - kept in the buffer; the next heartbeat sends it
                pass

    def flush(self) -> None:
        """Send the queued records; on failure they stay queued, in order, for the next try."""
        with self._buffer_lock:
            records, self._buffer = self._buffer, []
        if records:
            try:
                self._send(records)
            except BaseException:
                with self._buffer_lock:
                    self._buffer[:0] = records
                raise

    def report(self, record: dict, world: WorldInfo) -> None:
        """A `ctx.report` on any rank: every rank keeps its recent reports; rank 0's go to the driver."""
        self._reports.append(record)
        self.progress += 1
        if world.rank == 0:
            self.emit(dict(record))

    def _replay_reports(self, world: WorldInfo) -> None:
        """As a new rank 0, resend the reports kept from earlier worlds: the driver keeps those of steps
        whose report died with the old rank 0 (it never replaces one that arrived)."""
        if world.rank == 0 and not self._was_rank0 and self._reports:
            for record in self._reports:
                self.emit({**record, "replay": True, "member": self.member_id})
        self._was_rank0 = world.rank == 0

    def _forget_uncommitted_reports(self) -> None:
        """Reports of a step lost in flight describe a computation that never committed."""
        while self._reports and self._reports[-1].get("step") is not None and self._reports[-1]["step"] >= self.committed:
            self._reports.pop()

    # --- the loop -----------------------------------------------------------------

    def run(self) -> dict:
        """Serve the run until it ends for this worker; returns how it ended."""
        me = Member(
            id=self.member_id,
            joined_at=self._joined_at,
            node_id=self.node.get("node_id", ""),
            host=self.node.get("host", ""),
            labels=self.node.get("labels", {}),
            attestation=self.attestation.get("digest", ""),
        )
        self.election.register(me)
        beat = threading.Thread(target=self._heartbeat_loop, name=f"et-heartbeat-{self.member_id}", daemon=True)
        beat.start()
        try:
            return self._serve(me)
        except RunEnded as ended:
            return {"status": "ended", "outcome": ended.outcome, "step": self.committed}
        finally:
            self._stop.set()
            beat.join(timeout=5)
            self.flush()
            self._close_checkpoints()
            self.kept.release()  # nothing of the user's outlives the run
            self._live = self._at_commit = None

    def _serve(self, me: Member) -> dict:
        """Enter one world after another until this worker's run ends: finished, left, or failed.

        Whatever ended an entry is handled before the world is torn down (peers blocked on this rank
        are released by severing its sockets, which tearing down would forget).
        """
        last_term, was_member, last_rank = 0, False, 0
        rebuilds_without_progress = 0
        while True:
            bid = Member(**{**me.__dict__, "committed_step": self.committed, "detected_at": self.detected_at})
            plan = self.rendezvous.next_world(bid, last_term=last_term, was_member=was_member, last_rank=last_rank)
            self._refuse_plaintext_span(plan)
            self._refuse_outside_jurisdiction(plan)
            world = self._enter(plan)
            last_term, was_member, last_rank = plan.term, True, world.rank
            committed_before = self.committed
            ctx: Optional[Context] = None
            try:
                ctx = self._open_context(world)
                self.train_fn(ctx)
            except BaseException as exc:  # noqa: BLE001 - sorted by classify_exit
                exit_kind = classify_exit(exc)
                if exit_kind == LEFT:
                    self.election.mark_left(self.member_id)
                    self.emit(event("left", term=plan.term, step=self.committed, **self._notice_facts()))
                    return {"status": "left", "step": self.committed}
                if exit_kind == USER_ERROR:
                    self._fail_on_user_error(plan.term, exc)
                reason, cause = self._world_changed(plan.term, exc), exc
                # The ended entry's locals (its DDP wrapper and buckets, new objects of the older loop form)
                # would live on in the traceback through the next entry: a second copy while it rebuilds.
                traceback.clear_frames(exc.__traceback__)
                progressed = self.committed > committed_before
            else:
                if self._finish(ctx._state, world):
                    return {"status": "finished", "step": self.committed}
                reason, cause, progressed = self._leader_lost_at_the_end(plan.term), None, False
            finally:
                self._close_world(ctx)
            rebuilds_without_progress = 0 if progressed else rebuilds_without_progress + 1
            if rebuilds_without_progress > MAX_REBUILDS_WITHOUT_PROGRESS:
                reason = f"{rebuilds_without_progress} rebuilds without a committed step; last: {reason}"
                self.election.set_outcome(f"failed:{reason}")
                raise TrainingFailed(reason) from cause

    def _enter(self, plan) -> WorldInfo:
        """This member's place in the world `plan` publishes; tells the driver it joined."""
        world = WorldInfo.from_plan(plan, self.member_id)
        self.world, self._first_commit_of_term = world, True
        self._grow.clear()
        self._note_term(plan)
        self.emit(event("joined", term=plan.term, rank=world.rank, world_size=world.world_size,
                        leader=world.is_leader, pid=self.node.get("pid"), node_id=self.node.get("node_id"),
                        gpus=self.spec.scaling.worker_gpus(), **node_facts(self.node)))
        self._replay_reports(world)
        spare_since, self.rendezvous.spare_since = self.rendezvous.spare_since, None
        if spare_since is not None:
            self.emit(event("spare_joined", term=plan.term, rank=world.rank, waited_s=time.time() - spare_since))
        return world

    def _open_context(self, world: WorldInfo) -> Context:
        """Form the term's process groups (the world's and the topology's named ones) and the `Context`."""
        plan = world.plan
        sockets = GroupSockets()
        timeout_s = self.spec.failure.collective_timeout_s
        store = TermStore(self.election.store, plan.term, self.spec.secret, timeout_s, scope=self.spec.namespace)
        init_group(plan, world.rank, backend=self.spec.backend, timeout_s=timeout_s, device=self.device, store=store)
        topology = plan_topology(plan.members, plan.labels or None, self.spec.scaling.topology_policy())
        groups = build_groups(topology, world.rank, timeout_s=timeout_s)
        sockets.capture()
        if world.rank == 0:
            prune_terms(self.election.store, plan.term)  # every member of older terms has left them
        with self._group_lock:
            self._group_sockets = sockets
        if self.committed == NO_STATE:
            seed_everything(self.spec.run.seed)
        ctx = Context(TermSession(self, world, topology, groups), world, self.device)
        self._marks = {"grouped": time.time()}
        self.kept.begin_entry()
        _set_current(ctx)
        return ctx

    def _close_world(self, ctx: Optional[Context]) -> None:
        """The entry of `train_fn` ended: nothing of this world (hooks, data workers, DDP, groups) outlives it."""
        self.in_loop = False
        _set_current(None)
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks.clear()
        if ctx is not None:
            ctx._close_data()  # no DataLoader worker outlives its world
            ctx._accumulators.clear()
            ctx._release_wrappers()
        self.kept.end_entry(registered=ctx is not None and ctx._state is not None)
        if self._live is not None:
            self._live.release_world()
        with self._group_lock:
            self._group_sockets = None
        destroy_group(self.spec.backend)
        self.rendezvous.store_handle = None

    def _fail_on_user_error(self, term: int, exc: BaseException) -> None:
        """The user's code raised: the run ends for every member, with the worker's traceback."""
        reason = f"train_fn raised {type(exc).__name__}: {exc}"
        where = "".join(traceback.format_exception(exc)).rstrip()
        self.election.set_outcome(f"failed:{reason}", detail=where)
        self.emit(event("error", term=term, reason=reason))
        raise TrainingFailed(reason, cause=where) from exc

    def _note_term(self, plan) -> None:
        """Remember this term's members and their node facts, for the lineage of later checkpoints."""
        if self.spec.checkpoint.uri is None:
            return
        try:
            records = self.election.joined(plan.term)
        except Exception:  # noqa: BLE001 - the members' labels still come from the plan
            records = []
        batch = self.spec.batch
        self._lineage.joined(plan.term, world_facts(plan, records), batch.global_batch_size, batch.micro_batch_size)

    def _refuse_outside_jurisdiction(self, plan) -> None:
        """A world with a member whose node's region the policy does not allow ends the run at its start."""
        from elastictrain.fleet.jurisdiction import world_refusal

        refusal = world_refusal(plan.members, plan.labels, self.spec.scaling.allowed_regions)
        if refusal is not None:
            self.election.set_outcome(f"failed:{refusal}")
            self.emit(event("error", term=plan.term, reason=refusal))
            raise TrainingFailed(refusal)

    def _refuse_plaintext_span(self, plan) -> None:
        """A world across providers or regions on a network not declared private ends the run before
        any collective carries state over it."""
        refusal = plaintext_refusal(plan.labels, self.spec.network)
        if refusal is not None:
            self.election.set_outcome(f"failed:{refusal}")
            self.emit(event("error", term=plan.term, reason=refusal))
            raise TrainingFailed(refusal)

    def _world_changed(self, term: int, exc: BaseException) -> str:
        """A peer was lost or a rebuild was planned: fail peers fast, settle the step in flight; the reason."""
        self.detected_at = time.time()
        self._sever_group()
        in_flight, self.in_flight = self.in_flight, None
        if self._keep_stepped_step(term):
            in_flight = None
        self._forget_uncommitted_reports()
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        self.emit(event("world_changed", time=self.detected_at, term=term, step=self.committed,
                        in_flight=in_flight, reason=reason))
        return reason

    def _leader_lost_at_the_end(self, term: int) -> str:
        """The loop ran to the end, but the final save found a newer term: a rebuild finishes the run."""
        self.detected_at = time.time()
        reason = "the leader was lost before the run ended"
        self.emit(event("world_changed", time=self.detected_at, term=term, step=self.committed, reason=reason))
        return reason

    def _keep_stepped_step(self, term: int) -> bool:
        """A world change after the optimizer stepped (say, in a collective the loop body issues after
        `optimizer.step()`, to log a metric): the parameters already hold the next step, so that step
        counts as committed rather than being applied twice. Its counters and RNG stay as they are."""
        if not self._stepped or self._live is None:
            return False
        step = self._live.step
        self._live.step = step + 1
        self._mark_committed(self._live)
        rank = self.world.rank if self.world is not None else None
        self.emit(event("commit", term=term, step=step, rank=rank))
        self.emit(event("in_flight_step_kept", term=term, step=step))
        return True

    def _forget_state(self) -> None:
        """This member's objects are about to be overwritten: it holds no committed state until they are."""
        self.committed, self._live, self._at_commit, self._stepped = NO_STATE, None, None, False

    def _mark_committed(self, state: ElasticState) -> None:
        """`state` holds a committed step: note it, copy what a lost step could change before its optimizer
        step (buffers, plain entries, RNG states, small stateful objects); no step is in flight."""
        self.committed = state.step
        self._at_commit, self._stepped = state.commit_copy(reuse=self._at_commit), False

    def _watch_optimizers(self, state: ElasticState) -> None:
        def stepped(*_: Any) -> None:
            self._stepped = True

        for optimizer in state.optimizers():
            self._step_hooks.append(optimizer.register_step_post_hook(stepped))

    def _sever_group(self) -> None:
        """Spread a failure: peers blocked on this rank fail now instead of at the timeout."""
        with self._group_lock:
            if self._group_sockets is not None:
                self._group_sockets.sever()

    def _open_store(self) -> tuple[str, int, object]:
        """The leader's address for the world plan; the term's rendezvous lives in the run's key-value
        store (`TermStore`), so no port is opened."""
        return self.node.get("host") or "127.0.0.1", 0, None

    # --- hooks called from Context ------------------------------------------------

    def restore(self, state: ElasticState, world: WorldInfo, group: Any = None) -> None:
        """Bring `state` to the world's committed step: from memory, a peer, or storage (over `group`,
        the world's; rank 0 of the world is the source)."""
        plan = world.plan
        self._marks["reentered"] = time.time()  # train_fn is back at ctx.state: its objects are built or kept
        if self._live is not None and self.committed != NO_STATE:
            # Objects kept across the entry (ctx.keep) are the live ones: nothing is loaded into them, and
            # a step lost in flight leaves no buffer, counter or draw behind (`CommitCopy`).
            state.carry_over(self._live, self._at_commit)
        elif plan.restore_from_storage and world.rank == 0:
            self._restore_from_checkpoint(state)
        limits = StateLimits(growth=self.spec.failure.state_growth_limit)  # what a received state may take
        if world.world_size > 1 and (plan.needs_sync or plan.restore_from_storage):
            if world.rank != 0:
                # The state lands in this member's own tensors: once the first byte has, they hold no
                # committed step until the last one has. A transfer cut short leaves this member with no
                # state to bid, never a mix of two steps that it would hand out as its old one.
                self._forget_state()
            began = time.monotonic()
            take_rank0_state(state, device=self.device, group=group, limits=limits)
            if world.rank == 0:
                behind = [r for r in range(1, world.world_size)
                          if plan.restore_from_storage or plan.steps[r] != plan.source_step]
                self.emit(event("state_sent", term=world.term, step=state.step, bytes=state_bytes(state),
                                seconds=time.monotonic() - began, receivers=behind))
        elif world.world_size > 1 and not agree_or_broadcast(state, device=self._vote_device(), group=group,
                                                             limits=limits):
            # survivors at one step whose states differ: a bug or a non-deterministic state; rank 0's won
            self.emit(event("state_disagreed", term=world.term, step=state.step))
        self._live = state
        self._mark_committed(state)
        self._watch_optimizers(state)
        self._marks["restored"] = time.time()

    def _restore_from_checkpoint(self, state: ElasticState) -> None:
        manager = self._checkpoint_manager()
        if manager is None:
            return
        # Restore straight into the live CPU tensors (no second copy of the state). A failure here ends
        # the run (CheckpointError propagates), so tensors a damaged checkpoint half-filled are never trained.
        live, _ = state.flatten()
        loaded = manager.latest(into={n: t for n, t in live.items() if t.device.type == "cpu"})
        if loaded is None:
            return
        for uri, reason in getattr(loaded, "skipped", []) or []:
            self.emit(event("checkpoint_skipped", checkpoint=str(uri), reason=str(reason)))
        state.load_tree(unflatten_state(loaded.tensors, loaded.skeleton))
        self._lineage.saved(state.step)
        self.emit(event("restored_from_checkpoint", step=state.step,
                        checkpoint=str(getattr(loaded, "manifest_uri", ""))))

    def vote(self, world: WorldInfo) -> torch.Tensor:
        """This rank's boundary vote: a leave flag per rank, then the leader's grow flag."""
        n = world.world_size
        votes = torch.zeros(n + 1, dtype=torch.float64)
        votes[world.rank] = float(self._leave.is_set())
        votes[n] = float(world.is_leader and self._grow.is_set())
        return votes

    def at_step_boundary(self, state: ElasticState, world: WorldInfo, carried_vote: Optional[torch.Tensor] = None,
                         group: Any = None) -> None:
        """Agree with every rank whether the world changes before the next step.

        Leaving a gloo group does not close its sockets, so a rank that simply left
        would stall its peers for the whole collective timeout. Instead all ranks
        vote and stop together at the same boundary. The vote usually rode on the
        last step's item-count all-reduce (`carried_vote`); otherwise one tiny
        all-reduce carries it here. When someone leaves, the leader saves a
        checkpoint first, while this term is still current, and a barrier holds the
        others until it has committed. The leader saves because it is the run's
        one writer: a second one would race its retention against the leader's
        save in flight.
        """
        n = world.world_size
        if carried_vote is not None and carried_vote.numel() == n + 1:
            votes = carried_vote
        else:
            votes = self.vote(world).to(self._vote_device())
            if n > 1:
                dist.all_reduce(votes, group=group)
        votes = votes.tolist()
        leaving = [r for r in range(n) if votes[r] > 0]
        if not leaving and votes[n] == 0:
            return
        self._grow.clear()
        if leaving:
            if world.rank == leaving[0]:
                facts = self._notice_facts()
                facts.pop("used_s", None)
                self.emit(event("preemption_notice", term=world.term, step=state.step, **facts))
            in_loop, self.in_loop = self.in_loop, False  # waiting on storage is not a hang
            try:
                if world.is_leader:
                    self._save(state, world, wait=True)
                if n > 1:
                    dist.all_reduce(torch.zeros(1, device=self._vote_device()), group=group)  # barrier: the save committed
            finally:
                self.in_loop = in_loop
            if world.rank in leaving:
                raise LeaveWorld(f"member {self.member_id} leaves at step {state.step}")
        reason = f"ranks {leaving} leave" if leaving else "capacity is waiting to join"
        raise WorldChanged(world.term, f"planned at step {state.step}: {reason}")

    def wait_for_capacity(self, world: WorldInfo, timeout_s: float) -> bool:
        """Hold this rank until a live member waits outside `world` (and, on the leader, until it has decided
        to grow at the next step boundary); False after `timeout_s`. For fault schedules that must land
        on a whole world however long a replacement takes to start."""
        deadline = time.monotonic() + timeout_s
        lapse = self.spec.failure.heartbeat_timeout_s
        while not self.election.live_ids(lapse) - set(world.plan.members):
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            self._stop.wait(0.05)
        return not world.is_leader or self._grow.wait(max(0.0, deadline - time.monotonic()))

    def _vote_device(self) -> torch.device:
        return self.device if self.spec.backend == "nccl" else torch.device("cpu")

    def on_commit(self, state: ElasticState, world: WorldInfo, step: int) -> None:
        self._mark_committed(state)
        self._lineage.committed(world.term, step)
        now = time.time()
        self.emit(event("commit", time=now, term=world.term, step=step, rank=world.rank))
        if self._first_commit_of_term:
            self._first_commit_of_term = False
            if world.rank == 0 and world.plan.detected_at is not None:
                detected = world.plan.detected_at
                self.emit(event("recovered", time=now, term=world.term, world_size=world.world_size,
                                resumed_from=world.plan.source_step, recovery_s=now - detected,
                                elected_s=world.plan.published_at - detected,
                                restored_s=self._marks.get("restored", now) - detected,
                                phases=recovery_phases(detected, world.plan.published_at, self._marks, now)))
        if world.is_leader:
            manager = self._checkpoint_manager()
            if manager is not None and (self._save_owed or manager.should_save(state.step)):
                if manager.saving:
                    # Training stalls only for the snapshot, never on storage: a save that comes due while
                    # the last one is still uploading is taken at the first commit after that one lands.
                    if not self._save_owed:
                        self.emit(event("checkpoint_deferred", time=now, term=world.term, step=step))
                    self._save_owed = True
                else:
                    self._save_owed = False
                    self._save(state, world, wait=False)

    def _finish(self, state: Optional[ElasticState], world: WorldInfo) -> bool:
        """train_fn returned: the leader writes the final checkpoint, then ends the run.

        A follower waits for that as long as the leader lives. Returns False when this member must
        join a new world instead: the leader died (or a newer term began) before the run ended, so
        the survivors elect a leader again, which finds every step done and writes the final
        checkpoint under its own term.
        """
        if not world.is_leader:
            while self.election.outcome() is None:
                if not self.rendezvous.leader_alive(world.term) or self.election.newest_term() > world.term:
                    return False
                time.sleep(0.02)
            return True
        if state is not None and self._checkpoint_manager() is not None:
            self.emit(event("final_save_started", term=world.term, step=state.step))
        if state is not None and isinstance(self._save(state, world, wait=True), StaleTerm):
            return False  # a newer world leads now; its leader writes the final checkpoint
        self.election.set_outcome("done")
        return True

    # --- checkpoints ------------------------------------------------------------------

    def _checkpoint_manager(self):
        if self.spec.checkpoint.uri is None:
            return None
        if self._checkpoints is None:
            from elastictrain.checkpoint import CheckpointManager

            self._checkpoints = CheckpointManager(
                self.spec.checkpoint, fence=self.election.is_current, provenance=provenance(self.node),
                attestation=self.attestation or None,
                listener=self._on_checkpoint_event, newest_store=self._newest_store(),
                run_secret=self.spec.secret,
            )
        return self._checkpoints

    def _newest_store(self):
        """Where the newest committed step is kept outside the storage: Ray's KV store, under a namespace
        stable for the run's name (not this fit's), so a resubmitted job checks what the last one saved."""
        from elastictrain.election.ray_store import RayKVStore

        store = getattr(self.election, "store", None)
        if not isinstance(store, RayKVStore):
            return store  # an in-memory election (tests): the same store
        return RayKVStore(f"elastictrain/{self.spec.run_id}")

    def _on_checkpoint_event(self, record: Event) -> None:
        """A manifest was written: tell the driver now (from the saving thread), before this process can die."""
        if record.get("kind") == "checkpoint":
            if isinstance(record.get("step"), int):
                self._lineage.saved(record["step"])
            self.emit(event("checkpoint", time=record["time"], term=record.get("term"), step=record.get("step"),
                            bytes_written=record.get("bytes_written")))
        elif record.get("kind") == "checkpoint_rollback":  # a restore found only older checkpoints
            self.emit(event("checkpoint_rollback", time=record["time"], recorded_step=record.get("recorded_step"),
                            found_step=record.get("found_step")))

    def _save(self, state: ElasticState, world: WorldInfo, *, wait: bool) -> Optional[BaseException]:
        """Save through the checkpoint manager; a failed save is an event, not the end of training.

        Returns the error of the save when `wait` (or of the previous one, settled first), else None.
        The `checkpoint` event is emitted once a save has committed, not when it starts.
        """
        manager = self._checkpoint_manager()
        if manager is None:
            return None
        if self._last_saved_step == state.step:  # this step's save started already: wait for it if asked
            if not wait:
                return None
            pending = self._pending_save
            error = self._settle_save(manager)
            if error is None or (isinstance(error, StaleTerm) and pending is not None and pending[0] == world.term):
                return error
            # it failed (storage trouble, or an earlier term's save refused): write it again under this term
        error = self._settle_save(manager)
        try:
            tensors, skeleton = state.flatten()
            since = self._lineage.last_saved
            since = manager.recorded_step() if since is None else since
            manager.save(tensors, skeleton, step=state.step, term=world.term,
                         lineage=self._lineage.lineage(state.step, since))
        except Exception as exc:  # noqa: BLE001 - storage trouble must not stop training
            self.emit(event("checkpoint_failed", term=world.term, step=state.step,
                            reason=f"{type(exc).__name__}: {exc}"))
            return exc
        self._last_saved_step = state.step
        self._pending_save = (world.term, state.step)
        if wait or not manager.config.async_save:
            return self._settle_save(manager)
        return error

    def _settle_save(self, manager) -> Optional[BaseException]:
        """Wait for the save in flight (there is at most one) and report how it ended."""
        pending, self._pending_save = self._pending_save, None
        term, step = pending if pending is not None else (None, None)
        try:
            manager.wait()
        except Exception as exc:  # noqa: BLE001
            if step is not None and step == self._last_saved_step:
                self._last_saved_step = None  # not saved after all: a later _save of this step writes it
            self.emit(event("checkpoint_failed", term=term, step=step, reason=f"{type(exc).__name__}: {exc}"))
            return exc
        return None  # a commit was reported by `_on_checkpoint_event` as its manifest was written

    def _close_checkpoints(self) -> None:
        if self._checkpoints is not None:
            try:
                self._settle_save(self._checkpoints)
                self._checkpoints.close()
            finally:
                self._checkpoints = None

    # --- heartbeat ----------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = self.spec.failure.heartbeat_interval_s
        next_grow_check = 0.0
        while not self._stop.is_set():
            try:
                self._beats += 1
                self.election.heartbeat(self.member_id, Beat(seq=self._beats, progress=self.progress, in_loop=self.in_loop))
                if self.election.asked_to_leave(self.member_id):
                    self.request_leave(source="drain")
                world = self.world
                if world is not None and self.election.deaths() & set(world.plan.members):
                    self._sever_group()
                now = time.monotonic()
                if world is not None and world.is_leader and now >= next_grow_check:
                    next_grow_check = now + GROW_CHECK_INTERVAL_S
                    waiting = self.election.live_ids(self.spec.failure.heartbeat_timeout_s) - set(world.plan.members)
                    if should_grow(world.plan, waiting, self.spec.scaling.max_workers):
                        self._grow.set()
                self.flush()
            except Exception:  # noqa: BLE001 - a missed beat must not kill the worker; the next one retries
                pass
            self._stop.wait(interval)
