"""A state's tensors from one rank to the others in large pieces, with bounded memory.

Both sides derive the same plan from the announced layout alone (`plan_messages`, pure): a
tensor of at least `DIRECT_BYTES` travels on its own, in pieces of at most `BUCKET_BYTES`,
straight from the sender's tensor into the receiver's; smaller tensors travel packed as
bytes, whatever their dtype, in buckets of at most `BUCKET_BYTES`. So thousands of small
optimizer tensors take a handful of broadcasts, and every broadcast is large enough to run
at the link's rate.

A receiver that already holds a tensor of the same name, shape, dtype and home receives into
it: no second copy of the state exists at any time. What it does not hold (say, optimizer
state before its first step) is allocated once, at its final place. Each rank stages at most
one message in a byte buffer on the communication device: a bucket, or a piece of a tensor
that lives elsewhere (a CPU tensor under NCCL).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from elastictrain.runtime.layout import TensorSpec

__all__ = ["BUCKET_BYTES", "DIRECT_BYTES", "Message", "Piece", "TransferStats", "plan_messages", "receive_tensors",
           "recording", "send_tensors"]

BUCKET_BYTES = 32 * 1024 * 1024
"""The largest message: a bucket of small tensors or a piece of a large one (and the staging buffer's cap)."""

DIRECT_BYTES = 1024 * 1024
"""Tensors of at least this size travel on their own, without a copy into a bucket."""


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start + nbytes) of tensor `tensor` (its index in the layout), at byte `at` of its message."""

    tensor: int
    start: int
    nbytes: int
    at: int


@dataclass(frozen=True)
class Message:
    """One broadcast: a piece of one large tensor (`direct`) or a bucket of small tensors packed end to end."""

    nbytes: int
    pieces: tuple[Piece, ...]
    direct: bool


def plan_messages(sizes: Sequence[int], *, bucket_bytes: int, direct_bytes: int) -> list[Message]:
    """The broadcasts that carry tensors of `sizes` bytes, in layout order; sender and receivers call it alike.

    >>> [(m.nbytes, m.direct) for m in plan_messages([4, 4, 10], bucket_bytes=8, direct_bytes=5)]
    [(8, False), (8, True), (2, True)]
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, not {bucket_bytes}")
    direct_bytes = max(1, min(direct_bytes, bucket_bytes))
    messages: list[Message] = []
    packed: list[Piece] = []
    fill = 0
    for index, size in enumerate(sizes):
        if size <= 0:
            continue
        if size >= direct_bytes:
            for start in range(0, size, bucket_bytes):
                n = min(bucket_bytes, size - start)
                messages.append(Message(n, (Piece(index, start, n, 0),), direct=True))
            continue
        if fill + size > bucket_bytes:
            messages.append(Message(fill, tuple(packed), direct=False))
            packed, fill = [], 0
        packed.append(Piece(index, 0, size, fill))
        fill += size
    if packed:
        messages.append(Message(fill, tuple(packed), direct=False))
    return messages


@dataclass
class TransferStats:
    """What one transfer did on this rank, for tests and benchmarks (`recording()`).

    Attributes:
        broadcasts: tensor broadcasts issued (the header's are not counted).
        bytes_moved: bytes of tensors those broadcasts carried.
        staging_bytes: bytes of the staging buffer this rank allocated (0: none was needed).
        allocated_bytes: bytes of tensors a receiver allocated because it held none like them.
        in_place_bytes: bytes a receiver took straight into tensors it held.
    """

    broadcasts: int = 0
    bytes_moved: int = 0
    staging_bytes: int = 0
    allocated_bytes: int = 0
    in_place_bytes: int = 0
    in_place: set = field(default_factory=set)


_recorder: contextvars.ContextVar[Optional[TransferStats]] = contextvars.ContextVar("transfer_stats", default=None)


@contextlib.contextmanager
def recording() -> Iterator[TransferStats]:
    """Collect the `TransferStats` of the transfers this thread runs inside the block."""
    stats = TransferStats()
    token = _recorder.set(stats)
    try:
        yield stats
    finally:
        _recorder.reset(token)


def _stats() -> TransferStats:
    return _recorder.get() or TransferStats()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def _staging(messages: Sequence[Message], needs: Any, device: torch.device, stats: TransferStats) -> Optional[torch.Tensor]:
    size = max((m.nbytes for m in messages if needs(m)), default=0)
    if size == 0:
        return None
    stats.staging_bytes = max(stats.staging_bytes, size)
    return torch.empty(size, dtype=torch.uint8, device=device)


def send_tensors(tensors: Sequence[torch.Tensor], *, src: int, device: torch.device, group: Any = None) -> None:
    """Broadcast `tensors` (the layout's order) from this rank, rank `src` of `group`, by `plan_messages`."""
    stats = _stats()
    sources: list[Optional[torch.Tensor]] = [None] * len(tensors)

    def source(i: int) -> torch.Tensor:
        if sources[i] is None:  # a non-contiguous tensor is made contiguous once, not per piece
            sources[i] = _as_bytes(tensors[i].detach().contiguous())
        return sources[i]

    sizes = [t.numel() * t.element_size() for t in tensors]
    messages = plan_messages(sizes, bucket_bytes=BUCKET_BYTES, direct_bytes=DIRECT_BYTES)
    direct_ok = [t.device == device and t.is_contiguous() for t in tensors]
    staging = _staging(messages, lambda m: not (m.direct and direct_ok[m.pieces[0].tensor]), device, stats)
    pending: list = []
    for message in messages:
        if message.direct and direct_ok[message.pieces[0].tensor]:
            p = message.pieces[0]
            # pieces of tensors in place go out back to back: the next one is queued while one is on the wire
            pending.append(dist.broadcast(source(p.tensor)[p.start:p.start + p.nbytes], group=group,
                                          group_src=src, async_op=True))
        else:
            _drain(pending)
            buf = staging[:message.nbytes]
            for p in message.pieces:
                buf[p.at:p.at + p.nbytes].copy_(source(p.tensor)[p.start:p.start + p.nbytes])
            dist.broadcast(buf, group=group, group_src=src)
        stats.broadcasts += 1
        stats.bytes_moved += message.nbytes
        last = message.pieces[-1]
        if last.start + last.nbytes == sizes[last.tensor]:
            sources[last.tensor] = None  # its last byte is sent: drop a contiguous copy made for it
    _drain(pending)


def _drain(pending: list) -> None:
    """Wait for the queued broadcasts (in order: a failed one raises here, as a synchronous one would)."""
    while pending:
        pending.pop(0).wait()


def home_device(home: str, device: torch.device) -> torch.device:
    """Where a tensor announced as living on `home` ("cpu" or "cuda") lands on a rank communicating on `device`."""
    if home == device.type:
        return device
    return torch.device(home)


def receive_tensors(layout: Sequence[TensorSpec], *, src: int, device: torch.device, group: Any = None,
                    into: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Receive the tensors of a validated `layout` from rank `src` of `group`; name -> tensor.

    A tensor of `into` with the announced name, shape, dtype and home (contiguous) receives the bytes
    itself and is returned as it is; others are allocated at their home. Call only after the layout
    was checked (`layout.check_layout`): it decides how much is allocated.
    """
    stats = _stats()
    into = into or {}
    targets: list[torch.Tensor] = []  # what the bytes are written into (detached)
    received: dict[str, torch.Tensor] = {}
    for spec in layout:
        home = home_device(spec.home, device)
        own = into.get(spec.name)
        if (own is not None and tuple(own.shape) == spec.shape and own.dtype == spec.dtype
                and own.device.type == home.type and own.is_contiguous()):
            targets.append(own.detach())
            received[spec.name] = own
            stats.in_place.add(spec.name)
            stats.in_place_bytes += spec.nbytes
        else:
            targets.append(torch.empty(spec.shape, dtype=spec.dtype, device=home))
            received[spec.name] = targets[-1]
            stats.allocated_bytes += spec.nbytes
    views = [_as_bytes(t) if t.numel() else t for t in targets]
    direct_ok = [t.device == device for t in targets]
    messages = plan_messages([s.nbytes for s in layout], bucket_bytes=BUCKET_BYTES, direct_bytes=DIRECT_BYTES)
    staging = _staging(messages, lambda m: not (m.direct and direct_ok[m.pieces[0].tensor]), device, stats)
    pending: list = []
    for message in messages:
        p = message.pieces[0]
        if message.direct and direct_ok[p.tensor]:
            pending.append(dist.broadcast(views[p.tensor][p.start:p.start + p.nbytes], group=group, group_src=src,
                                          async_op=True))
        else:
            _drain(pending)
            buf = staging[:message.nbytes]
            dist.broadcast(buf, group=group, group_src=src)
            for p in message.pieces:
                views[p.tensor][p.start:p.start + p.nbytes].copy_(buf[p.at:p.at + p.nbytes])
        stats.broadcasts += 1
        stats.bytes_moved += message.nbytes
    _drain(pending)
    return received
