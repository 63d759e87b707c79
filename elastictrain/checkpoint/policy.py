"""When a checkpoint is due: every N steps or every T seconds, never twice for one step.

Pure: it is told the time, and told when a save started.
"""

from __future__ import annotations

from typing import Optional


class SavePolicy:
    """Decides whether a step's checkpoint is due from `every_steps`, `every_seconds` and the last save.

    >>> policy = SavePolicy(every_steps=10, every_seconds=None, now=0.0)
    >>> [s for s in range(1, 25) if policy.is_due(s, now=0.0)]
    [10, 20]
    """

    def __init__(self, every_steps: Optional[int], every_seconds: Optional[float], now: float):
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.last_step: Optional[int] = None
        self.last_time = now

    def is_due(self, step: int, now: float) -> bool:
        """True when `every_steps` or `every_seconds` says step `step` is due (never twice for one step)."""
        if self.last_step is not None and step <= self.last_step:
            return False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and now - self.last_time >= self.every_seconds

    def started(self, step: int, now: float) -> None:
        """A save of `step` started at `now`: the clock of `every_seconds` starts again from it."""
        self.last_step, self.last_time = step, now
