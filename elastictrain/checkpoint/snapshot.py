"""The only part of a save that stalls training: copying the state aside.

Tensors are copied into host buffers kept from the previous save (pinned and
non-blocking from CUDA; a plain copy on CPU), so no memory is allocated after
the first save. On CPU each piece is first compared with the buffer, which
still holds what the last committed save wrote: an unchanged piece is neither
copied nor hashed again, and keeps its chunk id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


PieceKey = tuple[str, int]  # (tensor name, piece index)


@dataclass(frozen=True)
class Snapshot:
    tensors: dict[str, torch.Tensor]  # contiguous CPU tensors the background save reads
    reuse: dict[PieceKey, str]  # pieces unchanged since the last committed save -> their chunk id


def piece_ranges(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each piece of a tensor of `nbytes` bytes; none for an empty tensor."""
    return [(off, min(chunk_size, nbytes - off)) for off in range(0, nbytes, chunk_size)]


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() % 8 == 0 and a.storage_offset() % 8 == 0 and b.storage_offset() % 8 == 0:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a, b)


class Snapshotter:
    """Keeps host buffers between saves and knows which of their pieces are already stored."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self._buffers: dict[str, torch.Tensor] = {}
        self._stored: dict[PieceKey, str] = {}

    def take(self, tensors: dict[str, torch.Tensor]) -> Snapshot:
        """Copy `tensors` into the buffers (the caller has waited for the previous save, and checked them
        with `codec.plan_entries`)."""
        # From the first copy on, the buffers no longer hold what the last save stored: forget the ids
        # now, so a take that fails part-way leaves nothing a later save could reuse wrongly.
        stored, self._stored = self._stored, {}
        self._buffers = {n: b for n, b in self._buffers.items() if n in tensors}
        reuse: dict[PieceKey, str] = {}
        cuda_devices: set[torch.device] = set()
        for name, live in tensors.items():
            live = live.detach().resolve_neg()  # a negative view's bytes are those of its base: resolve them
            buf = self._buffers.get(name)
            if buf is None or buf.shape != live.shape or buf.dtype != live.dtype:
                buf = torch.empty(live.shape, dtype=live.dtype, pin_memory=live.is_cuda)
                self._buffers[name] = buf
                stored = {k: v for k, v in stored.items() if k[0] != name}
            if live.is_cuda:
                cuda_devices.add(live.device)
                buf.copy_(live, non_blocking=True)
                continue
            src, dst = _flat_bytes(live.contiguous()), _flat_bytes(buf)
            for k, (off, n) in enumerate(piece_ranges(dst.numel(), self.chunk_size)):
                cid = stored.get((name, k))
                if cid is not None and _equal_bytes(src[off : off + n], dst[off : off + n]):
                    reuse[(name, k)] = cid
                else:
                    dst[off : off + n].copy_(src[off : off + n])
        for device in cuda_devices:  # each GPU's copies; synchronize() alone waits for the current one only
            torch.cuda.synchronize(device)
        return Snapshot(dict(self._buffers), reuse)

    def committed(self, piece_ids: dict[PieceKey, str]) -> None:
        """The snapshot just taken is stored: remember each piece's chunk id."""
        self._stored = dict(piece_ids)
