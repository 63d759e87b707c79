"""Fault injectors for the fault tier: callbacks that act when a step commits."""

from __future__ import annotations

import signal
import time
from typing import Callable, Optional

from elastictrain.trainer import RunView


class At:
    """Run `action(view)` once, when the run first reaches `step` with at least `min_members` in the world."""

    def __init__(self, step: int, action: Callable[[RunView], None], min_members: int = 1) -> None:
        self.step = step
        self.action = action
        self.min_members = min_members
        self.fired_at: Optional[float] = None

    def on_progress(self, view: RunView) -> None:
        if self.fired_at is None and view.step >= self.step and len(view.members()) >= self.min_members:
            self.fired_at = time.time()
            self.action(view)


def a_follower(view: RunView) -> str:
    return sorted(m for m, info in view.members().items() if not info["leader"])[0]


def kill_follower(view: RunView) -> None:
    view.signal(a_follower(view), signal.SIGKILL)


def kill_leader(view: RunView) -> None:
    view.signal(view.leader(), signal.SIGKILL)
