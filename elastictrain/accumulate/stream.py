"""Streaming sources that open at any sample position, so a step's samples are a function of the step.

A ``Stream`` has one method, ``open(position)``: an iterator of samples starting at
``position`` that can also ``skip(n)``. Step s of a stream-fed run takes positions
``[s*G, (s+1)*G)``; a rebuild or a restart re-opens the stream at the step's first
sample, so no data position is saved beyond the step number. Opening skips whole
shards of known length without reading them, a Hugging Face ``IterableDataset``
opens with its own ``skip`` (Arrow tables dropped without decoding), and anything
else is read and discarded up to the position.

Pure: numpy only (torch is touched only to read a Hugging Face stream inside a
DataLoader worker).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from elastictrain.errors import ShardLengthMismatch, UnsupportedSource

_END = object()
_SEED_MASK = (1 << 64) - 1


class SampleIterator:
    """Samples from a position on; ``position`` counts the samples before the next one."""

    position: int

    def __iter__(self) -> "SampleIterator":
        return self

    def __next__(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def skip(self, n: int) -> int:
        """Skip up to ``n`` samples; returns how many were skipped (fewer only at the end of the stream)."""
        done = 0
        while done < n:
            if next(self, _END) is _END:
                break
            done += 1
        return done


class Stream:
    """A source of samples in a fixed order that opens at any position."""

    def open(self, position: int) -> SampleIterator:  # pragma: no cover - abstract
        """An iterator at ``position`` (or at the end, with ``.position`` there, if the stream is shorter)."""
        raise NotImplementedError

    def shuffled(self, window: int, seed: int = 0) -> "Stream":
        """This stream with each window of ``window`` consecutive samples permuted, seeded by (seed, window).

        Unlike a shuffle buffer, the order at a position depends on that window only, so
        opening at a position reads less than one window before it.
        """
        return WindowShuffled(self, window, seed)


class ShardStream(Stream):
    """A stream made of shards, re-opened by calling ``shards()``.

    Args:
        shards: A function returning an iterable of shards, each an iterable of samples
            (a file reader, a generator). It is called again to re-open the stream, so it
            must give the same shards in the same order every time. Make shards lazy (a
            generator, an object that opens its file in ``__iter__``): a skipped shard is
            never iterated. Several epochs: yield the shards again.
        lengths: Samples in each shard, in order (may cover only the first shards). With
            lengths, opening or skipping past a shard does not read it; a shard read to
            its end is checked against its length.

    Example:
        >>> stream = ShardStream(lambda: (range(i * 10, i * 10 + 10) for i in range(3)), lengths=[10, 10, 10])
        >>> it = stream.open(25)
        >>> next(it), it.position
        (25, 26)
    """

    def __init__(self, shards: Callable[[], Iterable[Iterable[Any]]], lengths: Optional[Sequence[int]] = None):
        if not callable(shards):
            raise UnsupportedSource(
                f"ShardStream takes a function that returns the shards, not a {type(shards).__name__}: "
                "pass e.g. `lambda: (open_shard(p) for p in paths)` so the stream can be re-opened"
            )
        if lengths is not None:
            lengths = tuple(lengths)
            bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0]
            if bad:
                raise ValueError(f"shard lengths must be ints >= 0; got {bad[:3]}")
            lengths = tuple(int(n) for n in lengths)
        self._shards = shards
        self.lengths = lengths

    def open(self, position: int) -> SampleIterator:
        it = _ShardIterator(iter(self._shards()), self.lengths)
        it.skip(position)
        return it


class _ShardIterator(SampleIterator):
    def __init__(self, shards: Iterator[Iterable[Any]], lengths: Optional[tuple[int, ...]]):
        self._shards = shards
        self._lengths = lengths or ()
        self._index = -1  # the current shard
        self._current: Optional[Iterator[Any]] = None
        self._read = 0  # samples taken from the current shard
        self.position = 0

    def _length(self, index: int) -> Optional[int]:
        return self._lengths[index] if 0 <= index < len(self._lengths) else None

    def _open_next(self) -> bool:
        shard = next(self._shards, _END)
        if shard is _END:
            return False
        self._index += 1
        self._current, self._read = iter(shard), 0
        return True

    def _drop_current(self) -> None:
        close = getattr(self._current, "close", None)
        if close is not None:
            close()
        self._current = None

    def __next__(self) -> Any:
        while True:
            if self._current is None and not self._open_next():
                raise StopIteration
            sample = next(self._current, _END)
            if sample is not _END:
                self._read += 1
                self.position += 1
                return sample
            declared = self._length(self._index)
            if declared is not None and declared != self._read:
                raise ShardLengthMismatch(self._index, declared, self._read)
            self._current = None

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            if self._current is not None:
                declared = self._length(self._index)
                if declared is not None and 0 < declared - self._read <= n - done:
                    rest = declared - self._read  # the rest of this shard, without reading it
                    self._drop_current()
                    done += rest
                    self.position += rest
                    continue
            else:
                declared = self._length(self._index + 1)
                if declared is not None and declared <= n - done:
                    if next(self._shards, _END) is _END:  # a whole shard, never iterated
                        break
                    self._index += 1
                    done += declared
                    self.position += declared
                    continue
            if next(self, _END) is _END:
                break
            done += 1
        return done


class IterableStream(Stream):
    """A re-iterable source read from its start on each open: a torch ``IterableDataset``, a list, a
    Hugging Face ``IterableDataset`` (opened with its ``skip``, which drops whole Arrow tables)."""

    def __init__(self, source: Iterable[Any]):
        if iter(source) is source:
            raise UnsupportedSource(
                f"a one-shot iterator ({type(source).__name__}) cannot be re-opened at a step after a rebuild: "
                "pass something iterable afresh, or `et.ShardStream(lambda: shards)`"
            )
        self.source = source
        self._hf = _is_hf_iterable(source)

    def open(self, position: int) -> SampleIterator:
        if self._hf and position > 0:
            # skip() drops whole Arrow tables before decoding; past the end the stream is just empty
            return _CountingIterator(_iterate_whole(self.source.skip(position)), position, exact=False)
        it = _CountingIterator(_iterate_whole(self.source) if self._hf else iter(self.source), 0)
        it.skip(position)
        return it


class _CountingIterator(SampleIterator):
    def __init__(self, it: Iterator[Any], position: int, exact: bool = True):
        self._it = it
        self.position = position
        self.exact = exact  # False: opened past an unknown end; position is where it was asked to be

    def __next__(self) -> Any:
        sample = next(self._it)
        self.position += 1
        return sample


def _is_hf_iterable(source: Any) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.IterableDataset)


def _iterate_whole(dataset: Any) -> Iterator[Any]:
    """Iterate a Hugging Face stream whole, also inside a DataLoader worker.

    `datasets` gives each DataLoader worker a share of its shards when it sees worker
    info; here every worker reads the stream in order and keeps its own steps, so the
    first read (where `datasets` looks) runs without it.
    """
    it = iter(dataset)
    torch_worker = sys.modules.get("torch.utils.data._utils.worker")
    saved = getattr(torch_worker, "_worker_info", None)
    if saved is not None:
        torch_worker._worker_info = None
    try:
        first = next(it, _END)
    finally:
        if saved is not None:
            torch_worker._worker_info = saved
    if first is _END:
        return
    yield first
    yield from it


class WindowShuffled(Stream):
    """``base`` with each window ``[k*W, (k+1)*W)`` permuted by a generator seeded with (seed, k)."""

    def __init__(self, base: Stream, window: int, seed: int = 0):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an int >= 1")
        self.base, self.window, self.seed = base, window, seed

    def order(self, k: int, size: int) -> np.ndarray:
        """The order of window k holding ``size`` samples (the last window may be short)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed & _SEED_MASK, k])))
        return rng.permutation(size)

    def open(self, position: int) -> SampleIterator:
        k = position // self.window
        it = _WindowIterator(self, self.base.open(k * self.window), k)
        it.skip(position - k * self.window)
        return it


class _WindowIterator(SampleIterator):
    def __init__(self, stream: WindowShuffled, base: SampleIterator, k: int):
        self._stream, self._base = stream, base
        self._k = k
        self._buffer: list[Any] = []
        self._offset = 0
        self._loaded = False
        self.position = base.position  # short of k*W only when the stream ends before window k
        self.exact = getattr(base, "exact", True)

    def _load(self) -> None:
        samples = []
        for _ in range(self._stream.window):
            sample = next(self._base, _END)
            if sample is _END:
                break
            samples.append(sample)
        order = self._stream.order(self._k, len(samples))
        self._buffer, self._offset, self._loaded = [samples[i] for i in order], 0, True

    def _next_window(self) -> bool:
        if len(self._buffer) < self._stream.window:
            return False  # the window was short: the stream ended in it
        self._k += 1
        self._loaded = False
        return True

    def __next__(self) -> Any:
        while True:
            if not self._loaded:
                self._load()
            if self._offset < len(self._buffer):
                sample = self._buffer[self._offset]
                self._buffer[self._offset] = None  # give the sample's memory back once handed out
                self._offset += 1
                self.position += 1
                return sample
            if not self._next_window():
                raise StopIteration

    def skip(self, n: int) -> int:
        done = 0
        window = self._stream.window
        while done < n:
            if self._loaded:
                take = min(n - done, len(self._buffer) - self._offset)
                self._offset += take
                self.position += take
                done += take
                if done == n or not self._next_window():
                    break
            elif n - done >= window:
                skipped = self._base.skip(window)  # a whole window: its order does not matter
                done += skipped
                self.position += skipped
                if skipped < window:
                    break
                self._k += 1
            else:
                self._load()
        return done


def as_stream(source: Any) -> Optional[Stream]:
    """The ``Stream`` behind a data source, or None for a map-style dataset.

    Args:
        source: A ``Stream`` (``ShardStream``, a ``.shuffled`` one), a Hugging Face
            ``IterableDataset``, a torch ``IterableDataset`` or another re-iterable; a
            map-style dataset (``len`` and ``[i]``) gives None.

    Raises:
        UnsupportedSource: a one-shot iterator or generator, a function, or a value that is neither.
    """
    if isinstance(source, Stream):
        return source
    torch_data = sys.modules.get("torch.utils.data")
    if _is_hf_iterable(source) or (torch_data is not None and isinstance(source, torch_data.IterableDataset)):
        return IterableStream(source)
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return None
    if callable(source) and not hasattr(source, "__iter__"):
        raise UnsupportedSource(
            f"micro_batches got a function ({getattr(source, '__name__', type(source).__name__)}): "
            "if it returns shards, wrap it as et.ShardStream(fn, lengths=...)"
        )
    if hasattr(source, "__iter__"):
        return IterableStream(source)
    raise UnsupportedSource(
        f"micro_batches cannot read a {type(source).__name__}: give a map-style dataset (len and [i]), "
        "a Hugging Face or torch IterableDataset, or et.ShardStream(fn)"
    )
