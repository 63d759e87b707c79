"""Host-to-device copies of micro-batches that overlap compute.

On CUDA each batch is pinned and copied with ``non_blocking`` on a side stream
while the previous one is being computed; the compute stream waits for the copy
only when it takes the batch. Elsewhere (None, CPU) batches pass through as
they are, so the CPU/gloo path has the same semantics and no extra copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts, lists, tuples, namedtuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()  # a tensor on a GPU already: as is


def prefetch_to_device(batches: Iterable[Any], device: Any) -> Iterator[Any]:
    """Yield ``batches`` on ``device``, copying the next one while the current one computes.

    Args:
        batches: Collated batches on the host.
        device: Target device; None or a non-CUDA device passes batches through unchanged.

    Returns:
        An iterator of batches whose tensors live on ``device``.
    """
    dev = None if device is None else torch.device(device)
    if dev is None or dev.type != "cuda":
        return iter(batches)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _CudaPrefetcher(iter(batches), dev)


class _CudaPrefetcher:
    """One batch ahead: its copy runs on a side stream while the caller computes on the current one."""

    def __init__(self, source: Iterator[Any], device: torch.device):
        self._source = source
        self._device = device
        self._stream = torch.cuda.Stream(device=device)
        self._next: Optional[Any] = None
        self._done = False
        self._error: Optional[BaseException] = None  # the source's, raised once the batch before it is used
        self._load()

    def _load(self) -> None:
        try:
            host = next(self._source)
        except StopIteration:
            self._next, self._done = None, True
            return
        host = map_tensors(host, _pin)
        # The side stream must not start copying into memory the compute stream may still use.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._next = map_tensors(host, lambda t: t.to(self._device, non_blocking=True))

    def __iter__(self) -> "_CudaPrefetcher":
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            error, self._error = self._error, None
            self._done = True
            raise error
        if self._done:
            raise StopIteration
        current = torch.cuda.current_stream(self._device)
        current.wait_stream(self._stream)
        batch = self._next

        def keep_alive(t: torch.Tensor) -> torch.Tensor:
            # Tell the caching allocator the compute stream uses this memory, so it is
            # not handed to the next copy before the compute finishes.
            t.record_stream(current)
            return t

        batch = map_tensors(batch, keep_alive)
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - raised on the next call: this batch is already on the device
            self._error, self._next = exc, None
        return batch
