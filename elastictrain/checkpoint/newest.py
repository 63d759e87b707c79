"""The newest committed step, kept outside the checkpoint storage: what a rollback is measured against.

Whoever can delete from the storage (its provider, a leaked credential) can remove
a run's newest checkpoints, and a resume would then silently start from an older
one. After each commit the manager records the step in a small key-value store the
storage provider does not reach (Ray's GCS key-value store, under a namespace
stable for the run's name, so a resubmitted job reads what the last one wrote);
a resume that finds only older checkpoints says so (`checkpoint_rollback`).

The value is authenticated (HMAC-SHA256 bound to its key) with a key derived from
the run's checkpoint keys, so a holder of the Ray cluster token cannot forge a
record; it can still delete one, or put back an older one it saw, which hides a
rollback but causes nothing else: the record decides no load and no deletion.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from elastictrain.election.store import KVStore

MAX_RECORD_BYTES = 1024
_PURPOSE = b"elastictrain/v1/newest-step\x00"


@dataclass(frozen=True)
class RecordedStep:
    """The newest committed checkpoint as recorded outside the storage."""

    step: int
    term: int


class NewestStep(Protocol):
    """Where the newest committed step is kept outside the storage (put after each commit, get on resume)."""

    def put(self, step: int, term: int) -> None: ...

    def get(self) -> Optional[RecordedStep]:
        """The recorded step; None when nothing is recorded.

        Raises:
            ValueError: a record is there but malformed or not authenticated by this run's keys.
        """
        ...


def record_key(uri: str) -> str:
    """The store key for one checkpoint URI (a digest: the URI itself may name a bucket or a path)."""
    return "checkpoint/newest/" + hashlib.sha256(uri.encode()).hexdigest()[:32]


class KVNewestStep:
    """`NewestStep` on a `KVStore` (Ray's `RayKVStore` in a run, `MemoryStore` in tests).

    Args:
        store: the key-value store.
        uri: the checkpoint URI the record is about (one record per URI).
        mac_keys: 32-byte MAC keys; the first writes, any of them verifies (keys of earlier rotations).
    """

    def __init__(self, store: KVStore, uri: str, mac_keys: Sequence[bytes]):
        if not mac_keys:
            raise ValueError("a newest-step record needs at least one MAC key")
        self.store, self.key = store, record_key(uri)
        self._mac_keys = list(mac_keys)

    def __repr__(self) -> str:
        return f"KVNewestStep({self.key})"

    def _mac(self, mac_key: bytes, step: int, term: int) -> str:
        message = _PURPOSE + self.key.encode() + b"\x00" + f"{step}:{term}".encode()
        return hmac.new(mac_key, message, hashlib.sha256).hexdigest()

    def put(self, step: int, term: int) -> None:
        doc = {"mac": self._mac(self._mac_keys[0], step, term), "step": step, "term": term}
        self.store.put(self.key, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    def get(self) -> Optional[RecordedStep]:
        raw = self.store.get(self.key)
        if raw is None:
            return None
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"the newest-step record {self.key} is {len(raw)} bytes: not one this run wrote")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"the newest-step record {self.key} is not JSON") from None
        if not (
            isinstance(doc, dict) and set(doc) == {"mac", "step", "term"} and isinstance(doc["mac"], str)
            and all(type(doc[k]) is int and doc[k] >= 0 for k in ("step", "term"))
        ):
            raise ValueError(f"the newest-step record {self.key} is malformed")
        if not any(hmac.compare_digest(self._mac(k, doc["step"], doc["term"]), doc["mac"]) for k in self._mac_keys):
            raise ValueError(f"the newest-step record {self.key} does not verify under this run's keys")
        return RecordedStep(doc["step"], doc["term"])
