"""Read and verify one checkpoint: manifest -> keys -> table -> chunks -> tensors.

Every check happens before a tensor is handed out: manifest digest or
signature, run id, name, key, table, and each chunk's tag or hash and size. A
failure raises a CheckpointError naming what is wrong; no partial state is
ever returned.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from elastictrain.checkpoint import codec, crypto
from elastictrain.checkpoint.keys import Keyring
from elastictrain.checkpoint.manifest import (
    Body, Decoded, Table, check_signature, chunk_path, decode_manifest, open_table, parse_manifest_name,
)
from elastictrain.checkpoint.storage import Storage
from elastictrain.checkpoint.writer import SKELETON_KEY
from elastictrain.errors import CheckpointCorrupt, WrongKey
from elastictrain.statetree import skeleton_from_json


@dataclass
class Loaded:
    """A verified checkpoint, on CPU."""

    step: int
    term: int
    tensors: dict[str, torch.Tensor]
    skeleton: Any
    manifest_uri: str
    time_ns: int = 0
    provenance: dict[str, str] = field(default_factory=dict)
    header: bytes = b""  # the safetensors prefix; header + tensor bytes in order = an export
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Opened:
    """A manifest whose signature, run and keys checked out; its chunks are not read yet."""

    name: str
    body: Body
    table: Table
    keys: Optional[crypto.DataKeys]
    data_key: Optional[bytes]


def open_manifest(
    storage: Storage, name: str, keyring: Optional[Keyring], expected_run: Optional[str]
) -> Opened:
    """Fetch and verify a manifest and open its tensor table.

    Raises:
        CheckpointCorrupt, WrongKey, UnsupportedFormat: what is wrong with it.
    """
    try:
        raw = storage.get(name)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"manifest {name} is missing") from None
    decoded = decode_manifest(raw)
    return open_decoded(name, decoded, keyring, expected_run)


def open_decoded(name: str, decoded: Decoded, keyring: Optional[Keyring], expected_run: Optional[str]) -> Opened:
    body = decoded.body
    if parse_manifest_name(name) != (body.step, body.term):
        raise CheckpointCorrupt(f"manifest {name} says step {body.step} term {body.term} (renamed or moved)")
    if expected_run is not None and body.run != expected_run:
        raise CheckpointCorrupt(f"manifest {name} belongs to another run ({body.run[:12]}, not {expected_run[:12]})")
    if body.encrypted and keyring is None:
        raise WrongKey(f"checkpoint {name} is encrypted (key id {body.key_id}): pass its key")
    if not body.encrypted and keyring is not None:
        raise CheckpointCorrupt(f"manifest {name} is unencrypted in an encrypted run: refused")
    keys = data_key = None
    if body.encrypted:
        source = keyring.find(body.key_id)
        data_key = source.unwrap(body.wrapped_key, body.wrap_context())
        keys = crypto.DataKeys(data_key)
        check_signature(decoded, keyring.signer_for(source, data_key))
    return Opened(name, body, open_table(body, keys), keys, data_key)


def read_tensors(storage: Storage, opened: Opened, threads: int = 2) -> Loaded:
    """Fetch, verify and assemble every tensor of an opened checkpoint."""
    body, table, keys = opened.body, opened.table, opened.keys
    entries, metadata, data_len = codec.decode_header(table.header)
    if sum(n for _, n in table.pieces) != data_len or body.content_bytes != len(table.header) + data_len:
        raise CheckpointCorrupt(f"{opened.name}: tensor table and chunk list disagree on the size")
    raws = {e.name: codec.empty_tensor(e) for e in entries}
    # map each piece to its place: (chunk index) -> [(tensor name, offset, length)]
    targets: dict[int, list[tuple[str, int, int]]] = {}
    lengths: dict[int, int] = {}
    it = iter(table.pieces)
    for e in entries:
        off = 0
        while off < e.nbytes:
            try:
                index, n = next(it)
            except StopIteration:
                raise CheckpointCorrupt(f"{opened.name}: tensor table ends early") from None
            if n <= 0 or off + n > e.nbytes or lengths.setdefault(index, n) != n:
                raise CheckpointCorrupt(f"{opened.name}: a piece crosses a tensor boundary")
            targets.setdefault(index, []).append((e.name, off, n))
            off += n
    if next(it, None) is not None:
        raise CheckpointCorrupt(f"{opened.name}: tensor table has extra pieces")
    local = threading.local()

    def fetch(index: int) -> None:
        cid, stored = body.chunks[index]
        n = lengths[index]
        if stored != crypto.sealed_size(n, keys is not None):
            raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} has the wrong listed size")
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < stored:
            buf = local.buf = bytearray(max(stored, 1))
        view = memoryview(buf)
        try:
            got = storage.get_into(chunk_path(cid), view[:stored]) if hasattr(storage, "get_into") else None
            if got is None:
                data = storage.get(chunk_path(cid))
                got = len(data)
                if got <= stored:
                    view[:got] = data
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} is missing") from None
        if got != stored:
            raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} has {got} bytes, expected {stored} (truncated?)")
        (first, *rest) = targets[index]
        dst = _slice(raws, first)
        crypto.open_chunk(view[:stored], cid, n, keys, dst)
        for other in rest:
            _slice(raws, other)[:] = dst

    indices = list(targets)
    if threads > 1 and len(indices) > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="et-ckpt-read") as pool:
            list(pool.map(fetch, indices))
    else:
        for i in indices:
            fetch(i)
    try:
        skeleton = skeleton_from_json(metadata[SKELETON_KEY])
    except (KeyError, ValueError):
        raise CheckpointCorrupt(f"{opened.name}: state skeleton is missing or malformed") from None
    tensors = {e.name: codec.as_typed(raws[e.name], e) for e in sorted(entries, key=lambda e: e.begin)}
    uri = storage.uri.rstrip("/") + "/" + opened.name
    return Loaded(
        body.step, body.term, tensors, skeleton, uri, body.time_ns, dict(body.provenance), table.header
    )


def _slice(raws: dict[str, torch.Tensor], target: tuple[str, int, int]) -> memoryview:
    name, off, n = target
    return codec.byte_view(raws[name])[off : off + n]
