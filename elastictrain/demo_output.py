"""The demo's stdout without Ray's alarm about the workers the demo kills on purpose.

When a worker process dies by a signal, the raylet pushes an error to the driver ("A worker died or
was killed while executing a task by an unexpected system error ... (1) the process was killed by the
OOM killer ..."), which Ray's `ray_listen_error_messages` thread prints on the driver's stdout whatever
`log_to_driver` says. For the kills the demo injects itself that text misleads: it is replaced by one
line saying what happened, printed once. A worker that dies for any other reason (its pid is not one
the demo killed) is still reported as Ray says.
"""

from __future__ import annotations

import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, TextIO

RAY_WORKER_DIED = "A worker died or was killed while executing a task"
EXPLANATION = (
    "elastictrain demo: Ray reports each worker this demo kills on purpose (SIGKILL, as a lost machine) as "
    "'died or was killed ... by an unexpected system error', naming the OOM killer among the causes; "
    "those reports are the injected faults, not memory trouble, and are not shown."
)
_PID = re.compile(r"Worker PID: (\d+)")


class InjectedKills:
    """A driver callback collecting the pids of the workers the run's fault callbacks killed
    (`fault_injected` events; the member is still in the world's table when its event arrives)."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def on_progress(self, view) -> None:
        pass

    def on_event(self, view, event: dict) -> None:
        if event.get("kind") == "fault_injected":
            pid = view.members().get(event.get("member"), {}).get("pid")
            if isinstance(pid, int):
                self.pids.add(pid)


class KillReportFilter:
    """A text stream over `stream` that drops Ray's worker-death reports naming a pid in `pids`, and writes
    `EXPLANATION` instead the first time. Lines are assembled per writing thread (Ray's listener prints
    from its own), so another thread's half-written line is never mixed in."""

    def __init__(self, stream: TextIO, pids: set[int]) -> None:
        self.stream = stream
        self.pids = pids
        self.explained = False
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}

    def write(self, text: str) -> int:
        with self._lock:
            key = threading.get_ident()
            pending = self._partial.pop(key, "") + text
            *lines, rest = pending.split("\n")
            if rest:
                self._partial[key] = rest
            for line in lines:
                self._emit(line + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            key = threading.get_ident()
            rest = self._partial.get(key, "")
            if rest and "(raylet" not in rest:  # a prompt or a line without its end: show it now
                self.stream.write(self._partial.pop(key))
            self.stream.flush()

    def close_lines(self) -> None:
        """Write out every thread's unfinished line (the end of the demo)."""
        with self._lock:
            for rest in self._partial.values():
                self._emit(rest)
            self._partial.clear()
            self.stream.flush()

    def _emit(self, line: str) -> None:
        if RAY_WORKER_DIED in line:
            pid = _PID.search(line)
            if pid is not None and int(pid.group(1)) in self.pids:
                if not self.explained:
                    self.explained = True
                    self.stream.write(EXPLANATION + "\n")
                return
        self.stream.write(line)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)  # encoding, isatty, fileno...


@contextmanager
def explaining_injected_kills(pids: set[int]) -> Iterator[KillReportFilter]:
    """Within the block, stdout drops Ray's reports of the workers in `pids` (filled as the run goes)."""
    original = sys.stdout
    shown = KillReportFilter(original, pids)
    sys.stdout = shown
    try:
        yield shown
    finally:
        sys.stdout = original
        shown.close_lines()
