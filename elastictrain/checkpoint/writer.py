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
from typing import Any, Callable, Optional

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
    ) -> tuple[SaveReport, dict[PieceKey, str]]:
        """Write one checkpoint and return its report and each piece's chunk id.

        Raises:
            StaleTerm: the fence refused the commit; nothing was committed.
        """
        start = time.perf_counter()
        keys = run_keys.keys
        tensors = {n: (t if t.is_contiguous() else t.contiguous()) for n, t in tensors.items()}
        entries, header = layout.entries, layout.header()
        jobs = [
            ((e.name, k), off, n)
            for e in entries
            for k, (off, n) in enumerate(piece_ranges(e.nbytes, chunk_size))
        ]
        views = {e.name: codec.byte_view(tensors[e.name]) for e in entries}
        claimed: set[str] = set()
        lock = threading.Lock()
        stats = {"bytes": 0, "written": 0, "reused": 0}

        def store(job: tuple[PieceKey, int, int]) -> str:
            key, off, n = job
            view = views[key[0]][off : off + n]
            cid = reuse.get(key)
            size = crypto.sealed_size(n, keys is not None)
            if cid is None or self.known.get(cid) != size:
                cid = crypto.chunk_id(view, keys)
            with lock:
                if self.known.get(cid) == size or cid in claimed:
                    stats["reused"] += 1
                    return cid
                claimed.add(cid)
            self.storage.put(chunk_path(cid), crypto.SealedChunk(view, cid, keys))
            with lock:
                self.known[cid] = size
                self.damaged.discard(cid)
                stats["bytes"] += size
                stats["written"] += 1
            return cid

        if len(jobs) > 1 and self.threads > 1:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="et-ckpt-chunk") as pool:
                ids = list(pool.map(store, jobs))
        else:
            ids = [store(j) for j in jobs]

        order: dict[str, int] = {}
        for cid, (_, _, n) in zip(ids, jobs):
            order.setdefault(cid, len(order))
        sizes = {cid: crypto.sealed_size(n, keys is not None) for cid, (_, _, n) in zip(ids, jobs)}
        chunks = tuple((cid, sizes[cid]) for cid in order)
        table = Table(header, tuple((order[cid], n) for cid, (_, _, n) in zip(ids, jobs)))
        body = Body(
            run=run_keys.run, step=step, term=term, time_ns=int(clock() * 1e9),
            content_bytes=len(header) + sum(e.nbytes for e in entries), chunks=chunks,
            table=None if keys else table, key_id=run_keys.key_id, wrapped_key=run_keys.wrapped_key,
            provenance=provenance,
        )
        if keys is not None:
            body = replace(body, sealed_table=seal_table(body, table, keys, nonce(12)))
        raw = encode_manifest(body, run_keys.signer)
        flush = getattr(self.storage, "flush", None)
        if flush is not None:
            flush()  # every chunk durable before the manifest that lists them can be
        if fence is not None and not fence(term):
            raise StaleTerm(term, term + 1, f"checkpoint commit of step {step}")
        self.storage.put(body.name, [raw])
        if flush is not None:
            flush()  # the commit is durable before retention may remove older checkpoints
        report = SaveReport(
            step, term, body.name, body.content_bytes, stats["bytes"] + len(raw), stats["written"],
            stats["reused"], time.perf_counter() - start,
        )
        return report, {key: cid for (key, _, _), cid in zip(jobs, ids)}
