"""Election records as the run's processes leave them in the store: a MAC under the run secret, then the value.

The MAC (HMAC-SHA256 under the run secret's "election" subkey) covers the run's scope (its store
namespace), the record's key and its value, so a record written without the secret, or a genuine
record copied under another key (another term, another member) or into another run, does not open.
Pure: no store, no Ray.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from elastictrain.secret import MAC_BYTES, RunSecret

PURPOSE = "election"
MAGIC = b"et1:"
MAX_RECORD_BYTES = 1 << 20
"""No record of the election is near this size (a world of thousands of ranks is a few hundred KiB)."""


class RecordRejected(ValueError):
    """A stored value that is not a record of this run under its key; `reason` says why (no secret in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _signed(scope: str, key: str, payload: bytes) -> bytes:
    return json.dumps([scope, key]).encode() + b"\0" + payload


def mac_key(secret: RunSecret) -> bytes:
    """The key records are MAC'd under (derive it once per process: a record is read on every poll)."""
    return secret.subkey(PURPOSE)


def _mac(key_bytes: bytes, data: bytes) -> bytes:
    return hmac.new(key_bytes, data, hashlib.sha256).digest()


def seal_record(secret: RunSecret | bytes, scope: str, key: str, payload: bytes) -> bytes:
    """The stored form of `payload` under `key`: magic, MAC, payload (`secret`: the run secret or its `mac_key`)."""
    k = secret if isinstance(secret, bytes) else mac_key(secret)
    return MAGIC + _mac(k, _signed(scope, key, payload)) + payload


def open_record(secret: RunSecret | bytes, scope: str, key: str, raw: bytes) -> bytes:
    """The payload of a record sealed by `seal_record` for this scope and key.

    Raises:
        RecordRejected: oversized, not a sealed record, or its MAC does not verify for this key.
    """
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordRejected(f"oversized ({len(raw)} bytes)")
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + MAC_BYTES:
        raise RecordRejected("not a sealed record")
    tag, payload = raw[len(MAGIC):len(MAGIC) + MAC_BYTES], raw[len(MAGIC) + MAC_BYTES:]
    k = secret if isinstance(secret, bytes) else mac_key(secret)
    if not hmac.compare_digest(_mac(k, _signed(scope, key, payload)), tag):
        raise RecordRejected("MAC does not verify (written without the run secret, or under another key)")
    return payload
