"""Read and verify one checkpoint: manifest -> keys -> table -> chunks -> tensors.

Every check happens before a tensor is handed out: manifest digest or
signature, run id, name, key, table, and each chunk's tag or hash and size. A
failure raises a CheckpointError naming what is wrong; no partial state is
ever returned.
"""

from __future__ import annotations

import contextlib
import functools
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
    storage: Storage, name: str, keyring: Optional[Keyring], expected_run: Optional[str],
    signer: Optional[crypto.Signer] = None,
) -> Opened:
    """Fetch and verify a manifest and open its tensor table.

    `signer`: a plaintext run's manifest signer (`CheckpointConfig.signing_key`); with it, a plaintext
    manifest it did not sign is refused.

    Raises:
        CheckpointCorrupt, WrongKey, UnsupportedFormat: what is wrong with it.
    """
    try:
        raw = storage.get(name)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"manifest {name} is missing") from None
    decoded = decode_manifest(raw)
    return open_decoded(name, decoded, keyring, expected_run, signer)


def open_decoded(
    name: str, decoded: Decoded, keyring: Optional[Keyring], expected_run: Optional[str],
    signer: Optional[crypto.Signer] = None, data_keys: Optional[dict[tuple[str, bytes], bytes]] = None,
) -> Opened:
    """Check a decoded manifest's name, run, key and signature, and open its tensor table (no chunk is read).

    `data_keys`: a cache of unwrapped data keys by (key id, wrapped key), for callers that check many
    manifests of one run (a KMS key is asked once, not once per manifest).
    """
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
        cache_key = (body.key_id, body.wrapped_key)
        data_key = data_keys.get(cache_key) if data_keys is not None else None
        if data_key is None:
            data_key = source.unwrap(body.wrapped_key, body.wrap_context())
        keys = crypto.DataKeys(data_key)
        check_signature(decoded, keyring.signer_for(source, data_key))
        if data_keys is not None:  # only once the signature verified: a planted manifest adds nothing
            data_keys[cache_key] = data_key
    elif signer is not None:
        check_signature(decoded, signer)
    return Opened(name, body, open_table(body, keys), keys, data_key)


@dataclass(frozen=True)
class ReadPlan:
    """Where each stored chunk's bytes go, from a checkpoint's tensor table.

    `targets`: chunk index -> the places it fills, (tensor name, offset, length), in content order;
    `lengths`: chunk index -> its plaintext length (one chunk may fill several places of equal bytes).
    """

    targets: dict[int, list[tuple[str, int, int]]]
    lengths: dict[int, int]


def plan_reads(name: str, entries: list[codec.TensorEntry], pieces: tuple[tuple[int, int], ...]) -> ReadPlan:
    """Map the table's pieces, (chunk index, length) in content order, onto the tensors' bytes.

    Raises:
        CheckpointCorrupt: the pieces do not tile the tensors exactly (too few, too many, a piece across a
            tensor boundary, one chunk listed with two lengths).
    """
    targets: dict[int, list[tuple[str, int, int]]] = {}
    lengths: dict[int, int] = {}
    it = iter(pieces)
    for e in entries:
        off = 0
        while off < e.nbytes:
            try:
                index, n = next(it)
            except StopIteration:
                raise CheckpointCorrupt(f"{name}: tensor table ends early") from None
            if n <= 0 or off + n > e.nbytes or lengths.setdefault(index, n) != n:
                raise CheckpointCorrupt(f"{name}: a piece crosses a tensor boundary")
            targets.setdefault(index, []).append((e.name, off, n))
            off += n
    if next(it, None) is not None:
        raise CheckpointCorrupt(f"{name}: tensor table has extra pieces")
    return ReadPlan(targets, lengths)


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
    body, table = opened.body, opened.table
    entries, metadata, data_len = codec.decode_header(table.header)
    if sum(n for _, n in table.pieces) != data_len or body.content_bytes != len(table.header) + data_len:
        raise CheckpointCorrupt(f"{opened.name}: tensor table and chunk list disagree on the size")
    raws, fresh = _targets(entries, into or {})
    plan = plan_reads(opened.name, entries, table.pieces)
    fetch = functools.partial(_fetch_chunk, storage, opened, plan, raws, fresh)
    indices = list(plan.targets)
    if threads > 1 and len(indices) > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="et-ckpt-read") as pool:
            list(pool.map(fetch, indices))
    else:
        for i in indices:
            fetch(i)
    skeleton = _skeleton(opened.name, metadata)
    tensors = {e.name: codec.as_typed(raws[e.name], e) for e in sorted(entries, key=lambda e: e.begin)}
    uri = storage.uri.rstrip("/") + "/" + opened.name
    return Loaded(
        body.step, body.term, tensors, skeleton, uri, body.time_ns, dict(body.provenance), table.header
    )


def _fetch_chunk(
    storage: Storage, opened: Opened, plan: ReadPlan, raws: dict[str, torch.Tensor], fresh: set[str], index: int
) -> None:
    """Read chunk `index` into its first place, then copy it to the others."""
    cid, stored = opened.body.chunks[index]
    n = plan.lengths[index]
    if stored != crypto.sealed_size(n, opened.keys is not None):
        raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} has the wrong listed size")
    (first, *rest) = plan.targets[index]
    if first[0] in fresh:  # fault new pages in first: measured ~1.6x faster than faulting inside decrypt/copy
        name, off, length = first
        raws[name][off : off + length].zero_()
    dst = _slice(raws, first)
    _open_chunk_into(storage, opened, cid, stored, n, dst)
    for other in rest:
        _slice(raws, other)[:] = dst


def _open_chunk_into(storage: Storage, opened: Opened, cid: str, stored: int, n: int, dst: memoryview) -> None:
    """Fetch chunk `cid` (a memory map where storage offers one), check its size, and open it into `dst`.

    Raises:
        CheckpointCorrupt: carrying the chunk id: missing, truncated, or its tag or hash does not verify.
    """
    view_of = getattr(storage, "view", None)
    path = chunk_path(cid)
    problem = None
    try:
        with view_of(path) if view_of is not None else contextlib.nullcontext(storage.get(path, stored)) as blob:
            try:
                if len(blob) != stored:
                    raise CheckpointCorrupt(
                        f"{opened.name}: chunk {cid[:16]} has {len(blob)} bytes, expected {stored} (truncated?)"
                    )
                crypto.open_chunk(blob, cid, n, opened.keys, dst)
            except CheckpointCorrupt as exc:
                # raised again once the view is closed: this traceback holds slices of a memory map
                problem = str(exc)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{opened.name}: chunk {cid[:16]} is missing", cid) from None
    if problem is not None:
        raise CheckpointCorrupt(problem, cid)


def _skeleton(name: str, metadata: dict[str, str]) -> Any:
    try:
        return skeleton_from_json(metadata[SKELETON_KEY])
    except (KeyError, ValueError, RecursionError):
        raise CheckpointCorrupt(f"{name}: state skeleton is missing or malformed") from None


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
