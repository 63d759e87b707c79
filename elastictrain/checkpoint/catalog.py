"""What checkpoints a store holds, from its manifests alone: names in order, decoded bodies, a listing.

Nothing here verifies a signature or needs a key: it is what retention, the
run's identity and `elastictrain ckpt ls` look at before anything is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from elastictrain.checkpoint.manifest import MANIFEST_DIR, Body, decode_manifest, parse_manifest_name
from elastictrain.checkpoint.storage import Storage
from elastictrain.errors import CheckpointError


@dataclass(frozen=True)
class CheckpointInfo:
    """One stored checkpoint as `list()` and `elastictrain ckpt ls` show it (no key needed)."""

    name: str
    step: int
    term: int
    time_ns: int
    size: int  # bytes of the safetensors content
    stored_bytes: int  # bytes of its chunks in storage (shared chunks counted in each)
    encrypted: bool
    key_id: Optional[str]
    run: Optional[str]
    error: Optional[str] = None  # set when the manifest does not even parse
    provenance: dict = field(default_factory=dict)  # the saving node's labels, node id and host
    lineage: dict = field(default_factory=dict)  # who produced the steps since the previous checkpoint
    attestation: dict = field(default_factory=dict)  # the saving node's signed identity from its cloud

    @property
    def time(self) -> float:
        """When the checkpoint was written (seconds since the epoch)."""
        return self.time_ns / 1e9


def manifest_names(storage: Storage) -> list[str]:
    """Manifest names, oldest first by (step, term)."""
    named = [(parse_manifest_name(n), n) for n in storage.list(MANIFEST_DIR)]
    return [n for key, n in sorted(k for k in named if k[0] is not None)]


def read_body(storage: Storage, name: str) -> Optional[Body]:
    """The decoded body of a manifest; None if it does not decode or is gone (nothing verified)."""
    try:
        return decode_manifest(storage.get(name)).body
    except (CheckpointError, FileNotFoundError):
        return None


def newest_bodies(storage: Storage) -> Iterator[Body]:
    """The body of each manifest that decodes, newest first (damaged or vanished ones are passed over)."""
    for name in reversed(manifest_names(storage)):
        body = read_body(storage, name)
        if body is not None:
            yield body


def describe_checkpoints(storage: Storage) -> list[CheckpointInfo]:
    """Every checkpoint, oldest first, from the manifests alone (nothing verified but format)."""
    out = []
    for name in manifest_names(storage):
        step, term = parse_manifest_name(name)
        try:
            body = decode_manifest(storage.get(name)).body
        except (CheckpointError, FileNotFoundError) as exc:
            out.append(CheckpointInfo(name, step, term, 0, 0, 0, False, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        out.append(CheckpointInfo(
            name, body.step, body.term, body.time_ns, body.content_bytes, sum(s for _, s in body.chunks),
            body.encrypted, body.key_id, body.run, provenance=dict(body.provenance), lineage=body.lineage,
            attestation=dict(body.attestation),
        ))
    return out
