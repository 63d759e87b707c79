"""Read and verify one checkpoint: manifest -> keys -> table -> chunks -> tensors.

Every check happens before a tensor is handed out: manifest digest or
signature, run id, name, key, table, and each chunk's tag or hash and size. A
failure raises a CheckpointError naming what is wrong; no partial state is
ever returned.
"""

from __future__ import annotations

import contextlib
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
    data_key: Optional[bytes] = field(repr=False)  # the run's plaintext data key: never in a repr or a traceback


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
        raise CheckpointCorrupt(
            f"manifest {name} is unencrypted, but a key was given (and a checkpoint someone planted in an "
            "encrypted run would look the same): refused; read unencrypted checkpoints without a key"
        )
    keys = data_key = None
    if body.encrypted:
        source = keyring.find(body.key_id)
        data_key = source.unwrap(body.wrapped_key, body.wrap_context())
        keys = crypto.DataKeys(data_key)
        check_signature(decoded, keyring.signer_for(source, data_key))
    return Opened(name, body, open_table(body, keys), keys, data_key)


def read_tensors(
    storage: Storage, opened: Opened, threads: int = 2, into: Optional[dict[str, torch.Tensor]] = None
) -> Loaded:
    """Fetch, verify and assemble every tensor of an opened checkpoint.

    `into`: tensors to restore into, in place, by name (say, a model's current state). One is used when
    it is a contiguous CPU tensor of the stored dtype and shape whose memory no other target shares;
    any other entry gets a new tensor. Restoring in place skips allocating the state a second time,
    but if the checkpoint turns out damaged, the tensors it used hold a mix of old and restored bytes:
    pass `into` only when their old values are not needed after a failure (another checkpoint will be
    restored into them, or the run stops).
    """
    body, table, keys = opened.body, opened.table, opened.keys
    entries, metadata, data_len = codec.decode_header(table.header)
    if sum(n for _, n in table.pieces) != data_len or body.content_bytes != len(table.header) + data_len:
        raise CheckpointCorrupt(f"{opened.name}: tensor table and chunk list disagree on the size")
    raws, fresh = _targets(entries, into or {})
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
    view_of = getattr(storage, "view", None)

    def fetch(index: int) -> None:
        cid, stored = body.chunks[index]
        n = lengths[index]
        if stored != crypto.sealed_size(n, keys is not None):
            raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} has the wrong listed size")
        (first, *rest) = targets[index]
        if first[0] in fresh:  # fault new pages in first: measured ~1.6x faster than faulting inside decrypt/copy
            name, off, length = first
            raws[name][off : off + length].zero_()
        dst = _slice(raws, first)
        path = chunk_path(cid)
        problem = None
        try:
            with view_of(path) if view_of is not None else contextlib.nullcontext(storage.get(path, stored)) as blob:
                try:
                    if len(blob) != stored:
                        raise CheckpointCorrupt(
                            f"{opened.name}: chunk {cid[:16]} has {len(blob)} bytes, expected {stored} (truncated?)"
                        )
                    crypto.open_chunk(blob, cid, n, keys, dst)
                except CheckpointCorrupt as exc:
                    # raised again once the view is closed: this traceback holds slices of a memory map
                    problem = str(exc)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} is missing", cid) from None
        if problem is not None:
            raise CheckpointCorrupt(problem, cid)
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
    except (KeyError, ValueError, RecursionError):
        raise CheckpointCorrupt(f"{opened.name}: state skeleton is missing or malformed") from None
    tensors = {e.name: codec.as_typed(raws[e.name], e) for e in sorted(entries, key=lambda e: e.begin)}
    uri = storage.uri.rstrip("/") + "/" + opened.name
    return Loaded(
        body.step, body.term, tensors, skeleton, uri, body.time_ns, dict(body.provenance), table.header
    )


def _targets(
    entries: list[codec.TensorEntry], into: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A flat uint8 tensor per entry to receive its bytes (the matching `into` tensor's memory, else new),
    and the names of the new ones."""
    raws: dict[str, torch.Tensor] = {}
    fresh: set[str] = set()
    used: set[int] = set()
    for e in entries:
        t = into.get(e.name)
        usable = (
            isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
            and t.dtype == codec.CODES[e.dtype] and tuple(t.shape) == tuple(e.shape) and e.nbytes > 0
            and not t.is_neg()
        )
        if usable and t.untyped_storage().data_ptr() not in used:
            used.add(t.untyped_storage().data_ptr())
            raws[e.name] = t.detach().reshape(-1).view(torch.uint8)
        else:
            raws[e.name] = codec.empty_tensor(e)
            fresh.add(e.name)
    return raws, fresh


def _slice(raws: dict[str, torch.Tensor], target: tuple[str, int, int]) -> memoryview:
    name, off, n = target
    return codec.byte_view(raws[name])[off : off + n]
