"""Seeded fault schedules for the demo, chaos runs and benchmarks (local clusters)."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

from elastictrain.trainer import RunView

__all__ = ["Fault", "FaultSchedule", "hold_for_whole_world", "hold_until_faults", "recovery_report", "FAULT_KINDS", "ChaosFault", "NodeOps", "ChaosSchedule", "chaos_report", "node_processes", "silence_node", "kill_node"]


@dataclass
class Fault:
    step: int
    target: str  # "leader" or "follower"
    sig: int = signal.SIGKILL
    fired_at: Optional[float] = None
    member: Optional[str] = None
    fired_step: Optional[int] = None


@dataclass
class FaultSchedule:
    """Kills workers at given steps; a fault waits until the world is whole again.

    Args:
        faults: what to do and when, in step order.
        full_world: members the world must have before a fault fires, so one
            fault's recovery is over before the next begins.
    """

    faults: list[Fault]
    full_world: int = 1
    fired: list[Fault] = field(default_factory=list)

    @classmethod
    def random(cls, *, total_steps: int, count: int, seed: int, full_world: int) -> "FaultSchedule":
        """`count` kills spread over the run (one in each equal segment), alternating leader and follower."""
        rng = random.Random(seed)
        lo, hi = min(3, total_steps - 1), max(4, total_steps - 3)
        count = max(0, min(count, hi - lo))
        bounds = [lo + (hi - lo) * i // max(count, 1) for i in range(count + 1)]
        steps = [rng.randrange(a, max(a + 1, b - (b - a) // 2)) for a, b in zip(bounds, bounds[1:])]
        return cls([Fault(s, "leader" if i % 2 == 0 else "follower") for i, s in enumerate(steps)], full_world)

    def on_progress(self, view: RunView) -> None:
        pending = [f for f in self.faults if f.fired_at is None]
        if not pending:
            return
        fault = pending[0]
        members = view.members()
        if view.step < fault.step or len(members) < self.full_world or view.leader() is None:
            return
        followers = sorted(m for m, info in members.items() if not info["leader"])
        member = view.leader() if fault.target == "leader" or not followers else followers[0]
        fault.member, fault.fired_step = member, view.step
        fault.fired_at = view.signal(member, fault.sig)
        self.fired.append(fault)


def hold_for_whole_world(fault_steps: Sequence[int], workers: int, timeout_s: float = 120.0) -> Callable:
    """An `on_step(ctx, step)` for the toy loop: at each fault step, a world smaller than `workers` holds
    its loop until the missing capacity has started and waits to join (bounded), so the fault lands on a
    whole world on a busy machine too, where a replacement worker can take many steps to start."""
    steps = frozenset(fault_steps)

    def on_step(ctx, step: int) -> None:
        if step in steps and ctx.world_size < workers:
            ctx._session.wait_for_capacity(timeout_s)

    return on_step


def hold_until_faults(at_step: int, count: int = 1, timeout_s: float = 120.0) -> Callable:
    """An `on_step(ctx, step)` for the toy loop: at `at_step` of the first world, every rank holds its loop
    until the driver has injected `count` faults (`RunView.signal`), bounded by `timeout_s`. A fault fired
    by a callback at step `at_step - 1` then lands mid-run however slowly the driver sees steps commit."""

    def on_step(ctx, step: int) -> None:
        if step != at_step or ctx.term != 1:
            return
        ctx._session.wait_for_faults(count, timeout_s)

    return on_step


def recovery_report(schedule: FaultSchedule, result) -> list[dict]:
    """Per fault: who was killed, at which step, how long until training went on, steps computed again.

    Recovery runs from the kill to the first step committed by the rebuilt world.
    """
    rows = []
    recovered = [e for e in result.events if e["kind"] == "recovered"]
    for fault in schedule.fired:
        after = [e for e in recovered if e["time"] > fault.fired_at]
        row = {"step": fault.fired_step, "target": fault.target, "member": fault.member,
               "recovery_s": None, "resumed_from": None, "steps_redone": None}
        if after:
            first = after[0]
            earlier = {s for term, s in result.commits if term < first["term"]}
            row.update(recovery_s=first["time"] - fault.fired_at, resumed_from=first["resumed_from"],
                       steps_redone=sum(1 for s in earlier if s >= first["resumed_from"]))
        rows.append(row)
    return rows


# --- mixed fault schedules (resume-rate runs) -----------------------------------------------

FAULT_KINDS = (
    "kill_follower",       # SIGKILL a follower
    "kill_leader",         # SIGKILL the leader
    "node_loss",           # a follower's whole node vanishes; capacity comes back later
    "preempt",             # SIGTERM a follower (a spot notice); its process is killed once it has left
    "hang",                # SIGSTOP a follower: a hung process
    "kill_in_checkpoint",  # SIGKILL the leader right after a step that starts a checkpoint save
    "kill_in_rebuild",     # SIGKILL a follower, then another member ~30 ms later, during the rebuild
    "silent_node",         # a follower's whole node stops answering (every process SIGSTOPped, no connection
                           # closed), as a reclaimed VM does; it is removed and capacity comes back later
    "notice",              # the cloud's preemption notice for a follower's node (its fake metadata server);
                           # the node is reclaimed once the member has left, or when the warning runs out
)
_NODE_KINDS = ("node_loss", "silent_node", "notice")
_MIN_MEMBERS = {"kill_in_rebuild": 3}


@dataclass
class ChaosFault:
    """One fault of a mixed schedule and what happened when it fired."""

    kind: str
    index: int
    fired_at: Optional[float] = None
    fired_step: Optional[int] = None
    term: Optional[int] = None
    world_size: Optional[int] = None
    members: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)


class NodeOps(Protocol):
    """What a schedule needs to take a node away and give capacity back (a local multi-node cluster).

    It may also have `protected() -> set[str]`: node ids never to remove; `silence(node_id)`: stop
    the node's processes without closing a connection (`silent_node` faults need it; see `silence_node`);
    and `notice(node_id) -> Optional[float]`: switch on a preemption notice at the node's metadata service
    (a fake server, `elastictrain.testing.metadata`) and return the warning's length in seconds (None:
    unknown; `notice` faults need it).
    """

    def remove(self, node_id: str) -> None: ...

    def add(self) -> None: ...


def node_processes(node) -> list[int]:
    """Every process of a local cluster node (a `ray.cluster_utils.Cluster` node): its raylet and all the
    raylet's descendants (the node's workers, its dashboard and runtime-env agents)."""
    import psutil

    raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
    pids = []
    for pid in raylets:
        pids.append(pid)
        try:
            pids.extend(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


def silence_node(node) -> list[int]:
    """Make a local cluster node stop answering the way a reclaimed VM does: SIGSTOP every one of its
    processes (`node_processes`), so its peers see no connection close, only silence. Returns the pids
    stopped. End them with `kill_node` (`Cluster.remove_node` kills the raylet only: its stopped children
    would stay behind, stopped, for ever)."""
    stopped = []
    for pid in node_processes(node):
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    return stopped


def kill_node(cluster, node) -> None:
    """Remove a local cluster node for good: SIGKILL every one of its processes (`node_processes`, stopped
    ones included), then `Cluster.remove_node`."""
    for pid in node_processes(node):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


class ChaosSchedule:
    """Seeded mixed faults, one at a time, each once the run has recovered from the previous one.

    A fault fires when the newest world is past the previous fault's term, at least
    `gap_steps` steps after it, with `full_world` members (or, after waiting
    `full_world_wait_s`, with enough members for its kind). Node losses need
    `node_ops`; their capacity is added back `readd_after_s` later. A silent node (every process
    stopped, no connection closed) is removed for good and its capacity added back after
    `max(readd_after_s, silent_for_s)`: until then the run must find out by itself. Checkpoint-time
    kills fire on the first step seen whose commit triggers a save (`checkpoint_every`).
    A preempted member's process is SIGKILLed once the world has moved on without it
    (the machine goes away after its notice), which frees its slot. A cloud notice (`notice`) is
    switched on at the node's metadata service; the node is removed once the world has moved on
    without the member, or when the warning (`node_ops.notice`'s answer, else `preempt_grace_s`)
    runs out, and its capacity comes back `readd_after_s` later.
    Runs on the driver's thread (Ray's add_node must).

    Public as `elastictrain.ChaosSchedule`: a benchmark suite measures its own loop by passing one as a
    callback. Every fault it fires is a `fault_injected` event with the fault's kind (`fault`) and
    `index`, so `elastictrain report` gives the run's resume rate, recovery times and steps redone from
    the run's event log alone.

    >>> chaos = ChaosSchedule.mixed(count=20, seed=0, full_world=4, kinds=("kill_follower", "kill_leader"))
    >>> ElasticTrainer(train_fn, ..., callbacks=[chaos]).fit()  # doctest: +SKIP

    Args:
        faults: the faults, fired in order (`mixed` makes a seeded list).
        full_world: members the world must have before a fault fires.
        gap_steps: steps after the previous fault (and at the start) before the next fires.
        checkpoint_every: the run's `CheckpointConfig.every_steps` (needed by `kill_in_checkpoint`).
        node_ops: removes and adds nodes (needed by `node_loss`, `silent_node`, `notice`); a multi-node local cluster.
        readd_after_s: when capacity comes back after a node loss.
        full_world_wait_s: after this long with a smaller world, fire with enough members for the kind.
        rebuild_delay_s: the gap between the two kills of `kill_in_rebuild`.
        preempt_grace_s: a preempted member still running after this long is killed (and a noticed
            node whose warning length is unknown is removed).
        silent_for_s: how long a silenced node stays stopped before it is removed.
    """

    def __init__(
        self,
        faults: list[ChaosFault],
        *,
        full_world: int,
        gap_steps: int = 3,
        checkpoint_every: Optional[int] = None,
        node_ops: Optional[NodeOps] = None,
        readd_after_s: float = 1.0,
        full_world_wait_s: float = 20.0,
        rebuild_delay_s: float = 0.03,
        preempt_grace_s: float = 30.0,
        silent_for_s: float = 20.0,
        clock: Callable[[], float] = time.time,
        kill: Callable[[int, int], None] = os.kill,
    ) -> None:
        for f in faults:
            if f.kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {f.kind!r}; known: {', '.join(FAULT_KINDS)}")
            if f.kind in _NODE_KINDS and node_ops is None:
                raise ValueError(f"{f.kind} faults need node_ops (a multi-node cluster to remove nodes from)")
            if f.kind == "silent_node" and not callable(getattr(node_ops, "silence", None)):
                raise ValueError("silent_node faults need node_ops with silence(node_id) (see silence_node)")
            if f.kind == "notice" and not callable(getattr(node_ops, "notice", None)):
                raise ValueError("notice faults need node_ops with notice(node_id) (a fake metadata server per "
                                 "node; see elastictrain.testing.metadata)")
            if f.kind == "kill_in_checkpoint" and not checkpoint_every:
                raise ValueError("kill_in_checkpoint faults need checkpoint_every (the run's every_steps)")
        self.faults = faults
        self.full_world = full_world
        self.gap_steps = gap_steps
        self.checkpoint_every = checkpoint_every
        self.node_ops = node_ops
        self.readd_after_s = readd_after_s
        self.full_world_wait_s = full_world_wait_s
        self.rebuild_delay_s = rebuild_delay_s
        self.preempt_grace_s = preempt_grace_s
        self.silent_for_s = silent_for_s
        self.clock = clock
        self.kill = kill
        self.fired: list[ChaosFault] = []
        self._terminate: list[tuple[ChaosFault, str, int]] = []
        self._reclaim: list[tuple[ChaosFault, str, str, float]] = []  # (fault, member, node, warning's end)
        self.readds: list[float] = []
        self._readd_due: list[tuple[float, Optional[str]]] = []  # (when, a silenced node to remove first)
        self._ready_since: Optional[float] = None
        self._seen_step = -1

    @classmethod
    def mixed(cls, *, count: int, seed: int, kinds: Sequence[str] = FAULT_KINDS, **kwargs) -> "ChaosSchedule":
        """`count` faults: every kind in turn, in a seeded order within each round.

        Args:
            count: how many faults.
            seed: the order's seed (the same seed gives the same schedule).
            kinds: which of `FAULT_KINDS` to use; the default needs `node_ops` and `checkpoint_every`
                (pass `kinds=("kill_follower", "kill_leader", "preempt", "hang")` on a one-node cluster).
            **kwargs: the constructor's other arguments (`full_world` is required).
        """
        rng = random.Random(seed)
        order: list[str] = []
        while len(order) < count:
            round_ = list(kinds)
            rng.shuffle(round_)
            order.extend(round_)
        return cls([ChaosFault(kind, i) for i, kind in enumerate(order[:count])], **kwargs)

    @property
    def pending(self) -> list[ChaosFault]:
        return [f for f in self.faults if f.fired_at is None]

    def on_progress(self, view: RunView) -> None:
        now = self.clock()
        while self._readd_due and now >= self._readd_due[0][0]:
            _, silenced = self._readd_due.pop(0)
            if silenced is not None:
                self.node_ops.remove(silenced)  # the reclaimed machine is gone for good
            self.node_ops.add()
            self.readds.append(self.clock())
        self._end_preempted(view, now)
        self._reclaim_noticed(view, now)
        new_step = view.step != self._seen_step
        self._seen_step = view.step
        pending = self.pending
        if not pending:
            return
        fault = pending[0]
        members = view.members()
        if view.leader() is None or not self._recovered(view):
            self._ready_since = None
            return
        if self._ready_since is None:
            self._ready_since = now
        enough = len(members) >= self.full_world or (
            now - self._ready_since >= self.full_world_wait_s and len(members) >= _MIN_MEMBERS.get(fault.kind, 2)
        )
        if not enough:
            return
        if fault.kind == "kill_in_checkpoint" and not (new_step and (view.step + 1) % self.checkpoint_every == 0):
            return
        self._fire(fault, view, members)
        self._ready_since = None

    def _end_preempted(self, view: RunView, now: float) -> None:
        """A spot notice is followed by the machine going away: once the world moved on without
        the member (it saved and left), or after `preempt_grace_s`, its process is killed."""
        members = view.members()
        for entry in list(self._terminate):
            fault, member, pid = entry
            if member in members and now - fault.fired_at < self.preempt_grace_s:
                continue
            self._terminate.remove(entry)
            try:
                self.kill(pid, signal.SIGKILL)
                fault.detail["terminated_after_s"] = now - fault.fired_at
            except ProcessLookupError:
                fault.detail["terminated_after_s"] = None

    def _reclaim_noticed(self, view: RunView, now: float) -> None:
        """A noticed node goes away once its member has left the world (the warning was used), or when
        the warning runs out; its capacity comes back `readd_after_s` later."""
        members = view.members()
        for entry in list(self._reclaim):
            fault, member, node_id, due = entry
            if member in members and now < due:
                continue
            self._reclaim.remove(entry)
            self.node_ops.remove(node_id)
            fault.detail["reclaimed_after_s"] = now - fault.fired_at
            fault.detail["left_before_reclaim"] = member not in members
            self._due_readd(now + self.readd_after_s, None)

    def _due_readd(self, when: float, silenced: Optional[str]) -> None:
        self._readd_due.append((when, silenced))
        self._readd_due.sort(key=lambda item: item[0])

    def _recovered(self, view: RunView) -> bool:
        if not self.fired:
            return view.step >= self.gap_steps
        last = self.fired[-1]
        return view.term > last.term and view.step >= last.fired_step + self.gap_steps

    def _fire(self, fault: ChaosFault, view: RunView, members: dict) -> None:
        leader = view.leader()
        followers = sorted(m for m, info in members.items() if not info["leader"])
        fault.fired_step, fault.term, fault.world_size = view.step, view.term, len(members)
        kind = fault.kind
        if kind in ("kill_leader", "kill_in_checkpoint") or not followers:
            target = leader
        else:
            target = followers[len(self.fired) % len(followers)]
        fault.members = [target]
        tag = {"fault": kind, "index": fault.index}  # in the `fault_injected` event: reports read faults from the log
        if kind in _NODE_KINDS:
            protected = getattr(self.node_ops, "protected", lambda: set())()
            removable = [m for m in [*followers, leader] if members[m]["node_id"] not in protected]
            if not removable:
                fault.detail["note"] = "every member's node is protected; killed the process instead"
                fault.fired_at = view.signal(target, signal.SIGKILL, **tag)
                self.fired.append(fault)
                return
            target = removable[0] if target not in removable else target
            fault.members = [target]
            node_id = members[target]["node_id"]
            fault.fired_at = self.clock()
            fault.detail["node_id"] = node_id
            if kind == "notice":
                warning = self.node_ops.notice(node_id)
                grace = float(warning) if isinstance(warning, (int, float)) else self.preempt_grace_s
                fault.detail["warning_s"] = grace
                view.note_fault(target, time=fault.fired_at, node=node_id, warning_s=grace, **tag)
                self._reclaim.append((fault, target, node_id, fault.fired_at + grace))
                self.fired.append(fault)
                return
            if kind == "silent_node":
                fault.detail["stopped"] = len(self.node_ops.silence(node_id) or [])
                view.note_fault(target, time=fault.fired_at, node=node_id, silenced=True, **tag)
            else:
                self.node_ops.remove(node_id)
                view.note_fault(target, time=fault.fired_at, node=node_id, **tag)
            # A silent node stays stopped (its peers must find out by themselves) until its capacity comes back.
            delay = self.readd_after_s if kind == "node_loss" else max(self.readd_after_s, self.silent_for_s)
            self._due_readd(fault.fired_at + delay, node_id if kind == "silent_node" else None)
        elif kind == "preempt":
            fault.fired_at = view.signal(target, signal.SIGTERM, **tag)
            self._terminate.append((fault, target, members[target]["pid"]))
        elif kind == "hang":
            fault.fired_at = view.signal(target, signal.SIGSTOP, **tag)
        elif kind == "kill_in_rebuild":
            fault.fired_at = view.signal(target, signal.SIGKILL, **tag)
            time.sleep(self.rebuild_delay_s)
            second = leader if target != leader else next(m for m in followers if m != target)
            view.signal(second, signal.SIGKILL, **tag)
            fault.members.append(second)
            fault.detail["second_after_s"] = self.clock() - fault.fired_at
        else:
            fault.fired_at = view.signal(target, signal.SIGKILL, **tag)
        self.fired.append(fault)


def chaos_report(schedule: ChaosSchedule, result) -> list[dict]:
    """Per fired fault: did training go on by itself, how long it took, steps computed again.

    Resumed: a later world (term above the one the fault hit) committed a step.
    Recovery runs from the fault to that world's first committed step (from rank 0's
    reports). Steps redone: steps committed in a term up to the fault's that were
    committed again in the terms between this fault and the next.
    """
    history = [h for h in result.history if "term" in h and "time" in h]
    by_term: dict[int, set] = {}
    for term, step in result.commits:
        by_term.setdefault(term, set()).add(step)
    fired = sorted(schedule.fired, key=lambda f: f.fired_at)
    rows = []
    for i, fault in enumerate(fired):
        upto = fired[i + 1].term if i + 1 < len(fired) else None
        after = [h for h in history if h["term"] > fault.term and h["time"] > fault.fired_at]
        before = set().union(*[s for t, s in by_term.items() if t <= fault.term]) if by_term else set()
        later = set().union(*[s for t, s in by_term.items() if t > fault.term and (upto is None or t <= upto)]) \
            if by_term else set()
        first = after[0] if after else None
        rows.append({
            "index": fault.index, "kind": fault.kind, "step": fault.fired_step, "term": fault.term,
            "world_size": fault.world_size, "members": list(fault.members), "time": fault.fired_at,
            "resumed": first is not None,
            "recovery_s": (first["time"] - fault.fired_at) if first else None,
            "resumed_term": first["term"] if first else None,
            "steps_redone": len(before & later),
            **fault.detail,
        })
    return rows
