"""Heartbeats that carry training progress, judged on the receiver's own monotonic clock.

A worker's heartbeat thread writes a small record: a sequence number that grows
with every beat, and its training thread's progress counter with whether that
thread is inside the training loop (outside it, in a rendezvous, a restore or a
final save, no progress is expected). No clock of the sender is sent: whoever
reads beats notes on its own `time.monotonic()` when each value last changed, so
machines whose wall clocks disagree cannot make each other look dead or alive.
Pure: no store, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

MAX_BEAT_BYTES = 256


@dataclass(frozen=True)
class Beat:
    """One heartbeat record as written by a worker."""

    seq: int
    progress: int = 0
    in_loop: bool = False
    """The training thread is inside `ctx.steps` and not in a runtime wait: progress is expected."""

    def to_bytes(self) -> bytes:
        return json.dumps({"seq": self.seq, "progress": self.progress, "in_loop": self.in_loop}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Optional["Beat"]:
        """The beat in `raw`, or None when it is not one (oversized, not JSON, wrong types)."""
        if len(raw) > MAX_BEAT_BYTES:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        seq, progress, in_loop = data.get("seq"), data.get("progress", 0), data.get("in_loop", False)
        if not (_is_int(seq) and _is_int(progress) and isinstance(in_loop, bool)):
            return None
        return cls(seq=seq, progress=progress, in_loop=in_loop)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Seen:
    """What an observer knows of a member's beats, on the observer's monotonic clock."""

    beat_at: float
    """When the observer last saw a new beat."""
    progress_at: float
    """When it last saw the training progress change, or the loop begin or end."""
    in_loop: bool


class BeatWatch:
    """One observer's record of when each member's beat and progress last changed."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[bytes, Optional[Beat], Seen]] = {}

    def observe(self, member_id: str, raw: Optional[bytes], now: float) -> Optional[Seen]:
        """Fold in the beat just read (None: none written yet); returns what is known, None before any beat."""
        if raw is None:
            return None
        held = self._last.get(member_id)
        if held is not None and held[0] == raw:
            return held[2]
        beat = Beat.from_bytes(raw)
        if held is None:
            seen = Seen(beat_at=now, progress_at=now, in_loop=bool(beat and beat.in_loop))
        else:
            _, old, before = held
            moved = beat is None or old is None or (beat.progress, beat.in_loop) != (old.progress, old.in_loop)
            seen = Seen(beat_at=now, progress_at=now if moved else before.progress_at,
                        in_loop=bool(beat and beat.in_loop))
        self._last[member_id] = (raw, beat, seen)
        return seen

    def forget(self, member_id: str) -> None:
        self._last.pop(member_id, None)


def is_hung(seen: Optional[Seen], now: float, hang_timeout: Optional[float]) -> bool:
    """The training thread is in its loop and made no progress for `hang_timeout` seconds (None: never)."""
    if hang_timeout is None or seen is None or not seen.in_loop:
        return False
    return now - seen.progress_at > hang_timeout
