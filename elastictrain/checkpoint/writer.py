"""Write one checkpoint: encode -> hash -> seal -> put chunks in parallel -> fence -> put manifest.

The manifest is the commit and is written last, after every chunk it lists is
stored; a failure anywhere before it leaves no checkpoint (only unreferenced
chunks that retention removes later). Chunks already in storage are not
written again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional

import torch

from elastictrain.checkpoint import codec, crypto
from elastictrain.checkpoint.manifest import (
    Body, Table, chunk_path, encode_manifest, seal_table,
)
from elastictrain.checkpoint.snapshot import PieceKey, piece_ranges
from elastictrain.checkpoint.storage import Storage
from elastictrain.errors import StaleTerm
from elastictrain.statetree import skeleton_to_json

SKELETON_KEY = "elastictrain.skeleton"
FORMAT_KEY = "elastictrain.format"


@dataclass
class RunKeys:
    """Everything a save needs to seal and sign, fixed for the life of a manager."""

    run: str
    keys: Optional[crypto.DataKeys]  # None: unencrypted
    key_id: Optional[str] = None
    wrapped_key: Optional[bytes] = None
    signer: Optional[crypto.Signer] = None


@dataclass(frozen=True)
class SaveReport:
    step: int
    term: int
    name: str
    content_bytes: int
    bytes_written: int
    chunks_written: int
    chunks_reused: int
    seconds: float


def content_metadata(skeleton: Any) -> dict[str, str]:
    return {FORMAT_KEY: "1", SKELETON_KEY: skeleton_to_json(skeleton)}


@dataclass(frozen=True)
class Layout:
    """Where each tensor's bytes go in the content, and the metadata its safetensors header holds."""

    entries: list[codec.TensorEntry]
    metadata: dict[str, str]

    def header(self) -> bytes:
        return codec.encode_header(self.entries, self.metadata)


def plan_layout(tensors: dict[str, torch.Tensor], skeleton: Any) -> Layout:
    """The content's layout for these tensors (by name, dtype and shape only) and skeleton; checks that
    they can be stored without building the header (which a background save does).

    Raises:
        ValueError: a name, tensor or skeleton that cannot be stored, or a header over what safetensors reads.
    """
    layout = Layout(codec.plan_entries(tensors), content_metadata(skeleton))
    codec.check_header_size(layout.entries, layout.metadata)
    return layout


class Piece(NamedTuple):
    """One piece of a tensor's bytes; each is stored as one chunk."""

    key: PieceKey  # (tensor name, piece index)
    offset: int  # into the tensor's bytes
    length: int


def plan_pieces(entries: list[codec.TensorEntry], chunk_size: int) -> list[Piece]:
    """Every tensor's pieces of at most `chunk_size` bytes, in content order (none for an empty tensor)."""
    return [
        Piece((e.name, k), off, n)
        for e in entries
        for k, (off, n) in enumerate(piece_ranges(e.nbytes, chunk_size))
    ]


def chunk_table(
    pieces: list[Piece], ids: list[str], encrypted: bool
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[int, int], ...]]:
    """The manifest's chunk list and the tensor table's pieces, from each piece's chunk id.

    Returns:
        (chunk id, stored size) of each distinct chunk, in the order pieces first use them; and
        (chunk index, length) of each piece in content order (pieces with equal bytes share a chunk).
    """
    order: dict[str, int] = {}
    for cid in ids:
        order.setdefault(cid, len(order))
    sizes = {cid: crypto.sealed_size(p.length, encrypted) for cid, p in zip(ids, pieces)}
    chunks = tuple((cid, sizes[cid]) for cid in order)
    return chunks, tuple((order[cid], p.length) for cid, p in zip(ids, pieces))


def build_body(
    layout: Layout, header: bytes, pieces: list[Piece], ids: list[str], run_keys: RunKeys, *,
    step: int, term: int, time_ns: int, provenance: dict[str, str], nonce: Callable[[int], bytes],
    lineage: Optional[dict] = None, attestation: Optional[dict] = None,
) -> Body:
    """The manifest body listing these chunks; with encryption its tensor table is sealed, not in the clear."""
    keys = run_keys.keys
    chunks, table_pieces = chunk_table(pieces, ids, keys is not None)
    table = Table(header, table_pieces)
    body = Body(
        run=run_keys.run, step=step, term=term, time_ns=time_ns,
        content_bytes=len(header) + sum(e.nbytes for e in layout.entries), chunks=chunks,
        table=None if keys else table, key_id=run_keys.key_id, wrapped_key=run_keys.wrapped_key,
        provenance=provenance, lineage=lineage or {}, attestation=attestation or {},
    )
    if keys is not None:
        body = replace(body, sealed_table=seal_table(body, table, keys, nonce(12)))
    return body


class _ChunkPuts:
    """The chunk puts of one save, from several threads: which ids it claimed, and what it wrote."""

    def __init__(
        self, writer: "ChunkWriter", views: dict[str, memoryview], reuse: dict[PieceKey, str],
        keys: Optional[crypto.DataKeys],
    ):
        self.writer, self.views, self.reuse, self.keys = writer, views, reuse, keys
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.bytes = self.written = self.reused = 0

    def store(self, piece: Piece) -> str:
        """Store one piece unless storage (or another piece of this save) holds its chunk; its chunk id."""
        known = self.writer.known
        view = self.views[piece.key[0]][piece.offset : piece.offset + piece.length]
        cid = self.reuse.get(piece.key)
        size = crypto.sealed_size(piece.length, self.keys is not None)
        if cid is None or known.get(cid) != size:
            cid = crypto.chunk_id(view, self.keys)
        with self.lock:
            if known.get(cid) == size or cid in self.claimed:
                self.reused += 1
                return cid
            self.claimed.add(cid)
        self.writer.storage.put(chunk_path(cid), crypto.SealedChunk(view, cid, self.keys))
        with self.lock:
            known[cid] = size
            self.writer.damaged.discard(cid)
            self.bytes += size
            self.written += 1
        return cid


class ChunkWriter:
    """Stores the chunks of saves, remembering which ids storage already holds."""

    def __init__(self, storage: Storage, threads: int):
        self.storage = storage
        self.threads = threads
        self.known: dict[str, int] = {}  # chunk id -> stored size
        self.damaged: set[str] = set()  # ids a restore found damaged: written again when next needed

    def refresh(self) -> dict[str, int]:
        """Re-list stored chunks (another process may have removed some); returns the listing by name."""
        listing = self.storage.list("chunks")
        self.known = {name.rsplit("/", 1)[-1]: size for name, size in listing.items()}
        for cid in self.damaged:  # listed with the right size, yet its bytes do not verify
            self.known.pop(cid, None)
        return listing

    def write(
        self,
        tensors: dict[str, torch.Tensor],
        layout: Layout,
        *,
        step: int,
        term: int,
        run_keys: RunKeys,
        chunk_size: int,
        reuse: dict[PieceKey, str],
        fence: Optional[Callable[[int], bool]],
        provenance: dict[str, str],
        clock: Callable[[], float],
        nonce: Callable[[int], bytes],
        lineage: Optional[dict] = None,
        attestation: Optional[dict] = None,
    ) -> tuple[SaveReport, dict[PieceKey, str]]:
        """Write one checkpoint and return its report and each piece's chunk id.

        Raises:
            StaleTerm: the fence refused the commit; nothing was committed.
        """
        start = time.perf_counter()
        tensors = {n: (t if t.is_contiguous() else t.contiguous()) for n, t in tensors.items()}
        header = layout.header()
        pieces = plan_pieces(layout.entries, chunk_size)
        views = {e.name: codec.byte_view(tensors[e.name]) for e in layout.entries}
        puts = _ChunkPuts(self, views, reuse, run_keys.keys)
        ids = self._store_all(puts, pieces)
        body = build_body(
            layout, header, pieces, ids, run_keys, step=step, term=term, time_ns=int(clock() * 1e9),
            provenance=provenance, nonce=nonce, lineage=lineage, attestation=attestation,
        )
        raw = encode_manifest(body, run_keys.signer)
        self._commit(body.name, raw, fence, step=step, term=term)
        report = SaveReport(
            step, term, body.name, body.content_bytes, puts.bytes + len(raw), puts.written, puts.reused,
            time.perf_counter() - start,
        )
        return report, {p.key: cid for p, cid in zip(pieces, ids)}

    def _store_all(self, puts: _ChunkPuts, pieces: list[Piece]) -> list[str]:
        """Each piece's chunk id, storing the chunks storage lacks (in parallel where there are several)."""
        if len(pieces) > 1 and self.threads > 1:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="et-ckpt-chunk") as pool:
                return list(pool.map(puts.store, pieces))
        return [puts.store(p) for p in pieces]

    def _commit(
        self, name: str, raw: bytes, fence: Optional[Callable[[int], bool]], *, step: int, term: int
    ) -> None:
        """Write the manifest, the commit: after every chunk is durable, and only while `term` may write."""
        flush = getattr(self.storage, "flush", None)
        if flush is not None:
            flush()  # every chunk durable before the manifest that lists them can be
        if fence is not None and not fence(term):
            raise StaleTerm(term, term + 1, f"checkpoint commit of step {step}")
        self.storage.put(name, [raw])
        if flush is not None:
            flush()  # the commit is durable before retention may remove older checkpoints
