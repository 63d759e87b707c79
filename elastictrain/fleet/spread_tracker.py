"""Where each worker of a spread run is, step by step: the driver's memory for the spread policy.

Pure and steppable: fed starts, placements (a worker's node labels once its actor runs), exits, the
cluster's room and the clock; returns what to do (start, retarget, ask to leave) and what to say (the
spread went unmet, was restored). The driver's glue (`runtime/spread_control.py`) acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from elastictrain.fleet.spread import Assessment, SpreadPolicy, Target


@dataclass(frozen=True)
class AskToLeave:
    """Ask `member` (on `away_from`) to leave at a step boundary: `mover` on one of `to` is waiting to join."""

    member: str
    away_from: str
    to: str
    mover: str


@dataclass
class SpreadTracker:
    """The spread's state across driver steps.

    Args:
        policy: the run's spread policy.
        pending_timeout_s: a worker pending (not placed) this long is retargeted without the spread.
    """

    policy: SpreadPolicy
    pending_timeout_s: float
    placed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, tuple[Target, float]] = field(default_factory=dict)
    relax: int = 0
    met: bool = True
    mover: Optional[str] = None
    leaver: Optional[str] = None
    next_move_at: float = 0.0

    # --- starts and placements ------------------------------------------------------------

    def targets(self, count: int, room: Mapping[str, int]) -> list[Target]:
        """Targets of `count` workers to start now (a retarget's replacement first, relaxed)."""
        relax, self.relax = min(self.relax, count), max(0, self.relax - count)
        pending = [t.values for t, _ in self.pending.values()]
        return self.policy.plan_starts(count, self.placed.values(), pending, room, relax=relax)

    def started(self, member: str, target: Target, now: float) -> None:
        self.pending[member] = (target, now)

    def landed(self, member: str, value: Optional[str]) -> None:
        """`member`'s actor runs on a node whose label value is `value` (None: the node lacks the label)."""
        if self.pending.pop(member, None) is None:
            return  # already gone
        if value is not None:
            self.placed[member] = value

    def gone(self, member: str) -> None:
        self.pending.pop(member, None)
        self.placed.pop(member, None)
        if member == self.mover:
            self.mover = None
        if member == self.leaver:
            self.leaver = None

    def overdue(self, now: float) -> list[str]:
        """Workers pending longer than the bound: the caller stops them; their replacements start relaxed."""
        late = [m for m, (t, since) in self.pending.items() if t.values is not None and now - since > self.pending_timeout_s]
        for member in late:
            self.pending.pop(member)
            if member == self.mover:
                self.mover = None
                self.next_move_at = now + self.pending_timeout_s  # that value has no room after all: not at once
            else:
                self.relax += 1
        return late

    # --- compliance ----------------------------------------------------------------------------

    def assess(self) -> Optional[tuple[str, Assessment]]:
        """("spread_unmet" | "spread_restored", the assessment) when compliance changed, else None.
        Restored only once nothing is pending, so a half-placed pool is not called compliant."""
        found = self.policy.assess(self.placed.values())
        if self.met and not found.met:
            self.met = False
            return "spread_unmet", found
        if not self.met and found.met and not self.pending:
            self.met = True
            return "spread_restored", found
        return None

    # --- restoring the spread --------------------------------------------------------------

    def plan_mover(self, now: float, room: Mapping[str, int]) -> Optional[Target]:
        """The target of a worker to start toward the cap, one move at a time; None when none is due."""
        if self.mover is not None or self.leaver is not None or self.pending or now < self.next_move_at:
            return None
        move = self.policy.plan_move(self.placed.values(), room)
        return None if move is None else Target(move.to)

    def mover_started(self, member: str, target: Target, now: float) -> None:
        self.mover = member
        self.started(member, target, now)

    def ask(self, waiting: set[str], world: Mapping[str, object], leader: Optional[str]) -> Optional[AskToLeave]:
        """Once the mover is placed and waits to join, the world member to ask to leave (one at a time)."""
        mover = self.mover
        if mover is None or self.leaver is not None or mover not in self.placed or mover not in waiting:
            return None
        member = self.policy.choose_leaver(self.placed, [m for m in world if m != mover], leader)
        if member is None:  # the cap holds already (another loss did the work): the mover stays as a member
            self.mover = None
            return None
        self.leaver, self.mover = member, None
        return AskToLeave(member, self.placed[member], self.placed[mover], mover)
