"""The driver's progress display (`RunConfig(progress=True)`): a tqdm bar on a terminal, plain lines otherwise.

Both show the same facts: steps committed (of the total when `RunConfig.progress_total` is set), the
world's size, samples per second, the last loss rank 0 reported, workers lost and recoveries. A plain
line is printed at most every `every_s` seconds and only when something changed, so a log file gets a
readable record rather than a carriage-return stream (a changed rate alone prints nothing); the run's
end prints one more.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

from elastictrain.events import Event
from elastictrain.fleet.sample_rate import SampleRate

PREFIX = "[elastictrain]"


class _Bar(tqdm):
    """tqdm without its monitor thread: the display is refreshed from the driver's own loop, and a run
    leaves no thread behind."""

    monitor_interval = 0


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


class ProgressDisplay:
    """A driver callback showing the run's progress on `stream`.

    Args:
        global_batch_size: samples per optimizer step (for samples per second).
        total: steps the bar counts to, or None.
        stream: where it goes; stderr by default. A terminal gets a bar, anything else plain lines.
        every_s: the least time between two plain lines.
        clock: monotonic seconds.
    """

    REDRAW_S = 0.5
    """The least time between two redraws of the bar while no step commits."""

    def __init__(self, global_batch_size: int, total: Optional[int] = None, stream: Optional[TextIO] = None,
                 every_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.every_s = every_s
        self.clock = clock
        self.terminal = _is_terminal(self.stream)
        self._rate = SampleRate(global_batch_size)
        self._lost = 0
        self._recoveries = 0
        self._facts: Optional[dict] = None
        self._shown: Optional[dict] = None  # the facts of the last line or bar update
        self._last_line = float("-inf")
        self._bar: Optional[_Bar] = None
        self._closed = False

    # --- the callback -------------------------------------------------------------------

    def on_event(self, view, event: Event) -> None:
        kind = event.get("kind")
        if kind == "worker_lost":
            self._lost += 1
        elif kind == "recovered":
            self._recoveries += 1

    def on_progress(self, view) -> None:
        if self._closed:
            return
        now = self.clock()
        steps = view.step + 1
        rate = self._rate.observe(steps, now)
        loss = view.latest_report().get("loss")
        self._facts = {
            "steps": steps, "world": len(view.members()), "rate": rate,
            "loss": loss if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None,
            "lost": self._lost, "recoveries": self._recoveries,
        }
        if self.terminal:
            self._update_bar(self._facts, now)
        elif self._changed(self._facts) and now - self._last_line >= self.every_s:
            self._print_line(self._facts)
            self._last_line = now

    def close(self) -> None:
        """Show the last state and end the display (the bar stays on screen, finished). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            if self._facts is not None:
                self._bar.set_postfix_str(self.describe(self._facts), refresh=False)
                self._bar.n = self._facts["steps"]
            self._bar.close()  # draws the last state
            self._bar = None
        elif not self.terminal and self._facts is not None:
            self._print_line(self._facts, end=True)

    # --- rendering ------------------------------------------------------------------------

    def describe(self, facts: dict) -> str:
        """The facts besides the step count, as the bar's postfix and the plain line's tail."""
        parts = [f"world {facts['world']}"]
        if facts["rate"] is not None:
            parts.append(f"{facts['rate']:.4g} samples/s")
        if facts["loss"] is not None:
            parts.append(f"loss {facts['loss']:.4g}")
        parts.append(f"lost {facts['lost']}")
        parts.append(f"recoveries {facts['recoveries']}")
        return " | ".join(parts)

    def _update_bar(self, facts: dict, now: float) -> None:
        if facts == self._shown:
            return
        if self._bar is None:
            self._bar = _Bar(total=self.total, desc=PREFIX, unit="step", file=self.stream, dynamic_ncols=True,
                             leave=True)
        bar = self._bar
        bar.set_postfix_str(self.describe(facts), refresh=False)
        if facts["steps"] > bar.n:
            bar.update(facts["steps"] - bar.n)  # draws, at most every tqdm `mininterval`
        else:
            if facts["steps"] < bar.n:
                bar.n = facts["steps"]  # restored from an older checkpoint: the count goes back
            if now - self._last_line >= self.REDRAW_S:  # a stall: the world and rate still change
                bar.refresh()
                self._last_line = now
        self._shown = facts

    def _changed(self, facts: dict) -> bool:
        """Whether a plain line would say something new; the rate alone drifts every call and does not count."""
        if self._shown is None:
            return True
        return any(facts[k] != self._shown[k] for k in facts if k != "rate")

    def _print_line(self, facts: dict, end: bool = False) -> None:
        steps = f"{facts['steps']}/{self.total}" if self.total else str(facts["steps"])
        head = "run ended at step" if end else "step"
        print(f"{PREFIX} {head} {steps} | {self.describe(facts)}", file=self.stream, flush=True)
        self._shown = facts
