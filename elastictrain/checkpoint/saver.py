"""The async saver: one background save at a time, its error kept for whoever waits on it."""

from __future__ import annotations

import threading
from typing import Callable, Optional


class BackgroundSaver:
    """Runs a save on its own thread; `wait()` re-raises the error of the last one started."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def busy(self) -> bool:
        """Whether a save started here is still running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, save: Callable[[], None], name: str) -> None:
        """Run `save` on a new daemon thread named `name` (the caller has joined the one before)."""
        self._error = None  # an earlier save's failure was reported as it happened; wait() reports this one's
        self._thread = threading.Thread(target=self._run, args=(save,), name=name, daemon=True)
        self._thread.start()

    def _run(self, save: Callable[[], None]) -> None:
        try:
            save()
        except BaseException as exc:  # kept for wait(); a background thread has nobody else to tell
            self._error = exc

    def join(self) -> None:
        """Block until the save in flight, if any, has ended."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Block until the save in flight has ended; re-raise its error (once)."""
        self.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
