"""Samples per second of a run, from the committed steps the driver sees over a sliding window. Pure."""

from __future__ import annotations

from collections import deque
from typing import Optional


class SampleRate:
    """Training throughput as the driver sees it: committed steps x the global batch, per second.

    The driver learns of commits in batches (every pull, a tenth of a second), so one step's time is noisy;
    the rate is taken over the observations of the last `window_s` seconds. A stall (a rebuild) shows as a
    falling rate, and a step count that goes back (a restore from an older checkpoint) starts the window again.

    Args:
        global_batch_size: samples in one optimizer step (`BatchConfig.global_batch_size`).
        window_s: how far back the rate looks.

    >>> rate = SampleRate(global_batch_size=64, window_s=10.0)
    >>> rate.observe(0, now=0.0), rate.observe(5, now=2.0)
    (None, 160.0)
    """

    def __init__(self, global_batch_size: int, window_s: float = 10.0) -> None:
        if global_batch_size <= 0 or window_s <= 0:
            raise ValueError(f"global_batch_size={global_batch_size} and window_s={window_s} must be positive")
        self.global_batch_size = global_batch_size
        self.window_s = window_s
        self._seen: deque[tuple[float, int]] = deque()  # (time, steps committed), oldest first

    def observe(self, steps: int, now: float) -> Optional[float]:
        """Note that `steps` steps are committed at `now` (monotonic seconds); returns samples/s over the
        window, None until two observations are apart in time."""
        if self._seen and steps < self._seen[-1][1]:
            self._seen.clear()
        self._seen.append((now, steps))
        # Keep one observation at or before the window's start, so the rate spans the whole window.
        while len(self._seen) > 2 and self._seen[1][0] <= now - self.window_s:
            self._seen.popleft()
        return self.rate()

    def rate(self) -> Optional[float]:
        """Samples per second over the window; None before two observations apart in time."""
        if len(self._seen) < 2:
            return None
        (t0, s0), (t1, s1) = self._seen[0], self._seen[-1]
        if t1 <= t0:
            return None
        return (s1 - s0) * self.global_batch_size / (t1 - t0)
