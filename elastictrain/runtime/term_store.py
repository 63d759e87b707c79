"""Each term's rendezvous store: a `torch.distributed.Store` on the run's key-value store, sealed.

gloo and NCCL find each other through a store: every rank writes its address (gloo) or the
communicator id (NCCL) and reads the others'. A torch `TCPStore` would be one more port, open on
every interface of the leader's machine to whoever reaches it, that reads and writes without
authentication. This store opens no port: it keeps its values in Ray's GCS key-value store (the
election's store, behind the cluster's token) and seals each one with AES-256-GCM under the run
secret, bound to its key. Whoever can write Ray's store but does not hold the run secret can
neither read a rank's address nor plant one: a value that does not open fails the rendezvous with
a clear error instead of connecting a rank to a stranger.

Its errors are `torch.distributed.DistStoreError`s, as a `TCPStore`'s are: the runtime takes them for a
failed world (a rebuild), never for the user's code failing.

Only what the process groups use is served: `set`, `get`, `wait`, `check`, plus `add`,
`compare_set`, `delete_key` and `num_keys` for completeness. The store is never wrapped in torch's
`PrefixStore` (it cannot clone a Python store); the term prefix is applied here.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from elastictrain.election.store import KVStore
from elastictrain.secret import RunSecret

PURPOSE = "rendezvous"
PREFIX = "rdzv/"
_POLL_FIRST_S = 0.0005
_POLL_MAX_S = 0.004
MAX_VALUE_BYTES = 1 << 20
"""A rendezvous value is an address or a communicator id: a few hundred bytes. Larger is refused."""


def term_prefix(term: int) -> str:
    return f"{PREFIX}{term:012d}/"


class TermStore(dist.Store):
    """The rendezvous store of one term on `kv`, values sealed under `secret` and bound to `scope` (the
    run's store namespace: a value of another run under the same secret does not open here) and to
    their key."""

    def __init__(self, kv: KVStore, term: int, secret: RunSecret, timeout_s: float, *, scope: str = "") -> None:
        super().__init__()
        self._kv, self._prefix, self._secret = kv, term_prefix(term), secret
        self._scope = scope
        self._timeout_s = float(timeout_s)

    def _aad(self, full: str) -> bytes:
        return f"{self._scope}\n{full}".encode()

    def _full(self, key: str) -> str:
        return self._prefix + key

    def set(self, key: str, value) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if len(data) > MAX_VALUE_BYTES:
            raise ValueError(f"rendezvous value for {key!r} is {len(data)} bytes, over {MAX_VALUE_BYTES}")
        full = self._full(key)
        self._kv.put(full, self._secret.seal(PURPOSE, data, self._aad(full)))

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._open(key, self._kv.get(self._full(key)))

    def _open(self, key: str, raw: Optional[bytes]) -> bytes:
        if raw is None:
            raise dist.DistStoreError(f"rendezvous key {key!r} vanished from the run's store (a newer term pruned it)")
        if len(raw) > MAX_VALUE_BYTES + 64:
            raise dist.DistStoreError(f"rendezvous value for {key!r} is oversized: not written by this run")
        try:
            return self._secret.open(PURPOSE, raw, self._aad(self._full(key)))
        except ValueError:
            raise dist.DistStoreError(
                f"rendezvous value for {key!r} does not open under the run secret: someone other than the run's "
                "workers wrote it into Ray's key-value store; refusing to connect to the address it names"
            ) from None

    def check(self, keys: list[str]) -> bool:
        return all(self._kv.get(self._full(k)) is not None for k in keys)

    def wait(self, keys: list[str], timeout: Optional[timedelta] = None) -> None:
        limit = self._timeout_s if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + (limit if limit > 0 else self._timeout_s)
        pending = list(keys)
        pause = _POLL_FIRST_S
        while True:
            pending = [k for k in pending if self._kv.get(self._full(k)) is None]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise dist.DistStoreError(
                    f"rendezvous timed out after {limit:.1f} s waiting for {pending[:4]} (socket timeout: a peer never "
                    "wrote its address)"
                )
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def add(self, key: str, amount: int) -> int:
        """Atomic counter: each call claims the next free slot of `key` (create-if-absent), so no two
        calls read-modify-write the same value; the result sums the slots up to the one claimed."""
        total, slot = 0, 0
        while True:
            full = f"{self._full(key)}#{slot}"
            if self._kv.put_if_absent(full, self._secret.seal(PURPOSE, str(int(amount)).encode(), self._aad(full))):
                return total + int(amount)
            raw = self._kv.get(full)
            total += int(self._secret.open(PURPOSE, raw, self._aad(full))) if raw is not None else 0
            slot += 1

    def compare_set(self, key: str, expected, desired) -> bytes:
        full = self._full(key)
        current = self._kv.get(full)
        if current is None:
            if not bytes(expected) and self._kv.put_if_absent(full, self._secret.seal(PURPOSE, bytes(desired), self._aad(full))):
                return bytes(desired)
            current = self._kv.get(full)
            if current is None:
                return bytes(expected)
        value = self._open(key, current)
        if value == bytes(expected):
            self.set(key, desired)
            return bytes(desired)
        return value

    def delete_key(self, key: str) -> bool:
        existed = self._kv.get(self._full(key)) is not None
        self._kv.delete(self._full(key))
        return existed

    def num_keys(self) -> int:
        return len(self._kv.keys(self._prefix))


def prune_terms(kv: KVStore, before_term: int) -> int:
    """Delete the rendezvous keys of every term older than `before_term`; returns how many went."""
    count = 0
    for key in kv.keys(PREFIX):
        try:
            term = int(key[len(PREFIX):].split("/", 1)[0])
        except ValueError:
            continue
        if term < before_term:
            kv.delete(key)
            count += 1
    return count
