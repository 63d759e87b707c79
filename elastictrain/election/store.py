"""The small key-value protocol elections run on, and an in-memory store for tests.

The default store is Ray's GCS internal KV (`ray_store.RayKVStore`); anything with
an atomic create-if-absent can serve.
"""

from __future__ import annotations

import threading
from typing import Optional, Protocol


class KVStore(Protocol):
    """Keys are str, values bytes. `put_if_absent` must be atomic."""

    def put_if_absent(self, key: str, value: bytes) -> bool:
        """Write `value` under `key` unless the key exists; True when this call wrote it."""

    def put(self, key: str, value: bytes) -> None:
        """Write or overwrite."""

    def get(self, key: str) -> Optional[bytes]:
        """The value, or None."""

    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`."""

    def delete(self, key: str) -> None:
        """Remove the key if present."""


class MemoryStore:
    """A thread-safe dict with the KVStore protocol, for unit tests and single-process use."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put_if_absent(self, key: str, value: bytes) -> bool:
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = bytes(value)
            return True

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = bytes(value)

    def get(self, key: str) -> Optional[bytes]:
        with self._lock:
            return self._data.get(key)

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return [k for k in self._data if k.startswith(prefix)]

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)
