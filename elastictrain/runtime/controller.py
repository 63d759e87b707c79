"""Driver-side decisions: keep the worker pool full, count failures, stop refilling once the run ended.

Pure: the controller is stepped with observations and returns decisions; the
driver loop in `trainer.py` acts on them (spawn, mark dead, kill, stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Decision:
    spawn: int = 0
    fail: Optional[str] = None


@dataclass
class PoolController:
    """Tracks the pool of worker actors and the failure budget.

    Args:
        max_workers: the pool never holds more live or pending actors.
        max_failures: lost workers tolerated; -1 for no limit.
    """

    max_workers: int
    max_failures: int
    active: set[str] = field(default_factory=set)
    failures: int = 0
    ended: bool = False

    def start(self) -> Decision:
        return Decision(spawn=self.max_workers - len(self.active))

    def spawned(self, member_id: str) -> None:
        self.active.add(member_id)

    def lost(self, member_id: str) -> Decision:
        """A worker's process died (or was killed for a lapsed heartbeat)."""
        self.active.discard(member_id)
        self.failures += 1
        if 0 <= self.max_failures < self.failures:
            return Decision(fail=f"{self.failures} workers lost, more than max_failures={self.max_failures}")
        return self._refill()

    def left(self, member_id: str) -> Decision:
        """A worker left cleanly (preemption notice): replace it, count no failure."""
        self.active.discard(member_id)
        return self._refill()

    def returned(self, member_id: str, status: str) -> Decision:
        """A worker's run() returned: finished the loop, or saw the run end. No replacement follows."""
        self.active.discard(member_id)
        if status in ("finished", "ended"):
            self.ended = True
        return Decision()

    def _refill(self) -> Decision:
        if self.ended:
            return Decision()
        return Decision(spawn=self.max_workers - len(self.active))
