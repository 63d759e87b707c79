"""Seeded fault schedules for the demo, chaos runs and benchmarks (local clusters)."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from typing import Optional

from elastictrain.trainer import RunView


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
