"""One rank's micro-batches of consecutive steps of a stream, read from one open iterator.

Step s takes stream positions ``[s*G, (s+1)*G)``; this rank reads its plan's slice and
then skips the rest of the global batch, so the iterator sits at the next step's first
sample and consecutive steps never seek. The skip also proves the whole global batch
exists before the rank's last micro-batch is handed out: a partial last batch is never
trained, on any rank.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from elastictrain.accumulate.plan import RankPlan
from elastictrain.accumulate.stream import SampleIterator, Stream
from elastictrain.errors import StepOrderError, StreamExhausted

_END = object()


class StreamSteps:
    """This rank's sample groups, step after step; steps only move forward.

    Args:
        stream: The source, opened at the first step asked for.
        plan: This rank's share of every global batch.
        global_batch_size: G.
    """

    def __init__(self, stream: Stream, plan: RankPlan, global_batch_size: int):
        self._stream = stream
        self._plan = plan
        self._g = global_batch_size
        self._it: Optional[SampleIterator] = None
        self.last_step: Optional[int] = None

    def groups(self, step: int) -> Iterator[list[Any]]:
        """The samples of each of this rank's micro-batches of ``step``, in order.

        Raises:
            StepOrderError: ``step`` is not after the last step asked for.
            StreamExhausted: the stream ends before the last sample of step ``step``'s global batch.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        if self.last_step is not None and step <= self.last_step:
            raise StepOrderError(step, self.last_step)
        self.last_step = step
        return self._read(step)

    def _read(self, step: int) -> Iterator[list[Any]]:
        first = step * self._g + self._plan.start
        it = self._seek(first, step)
        sizes = self._plan.micro_sizes
        for i, size in enumerate(sizes):
            self._check_current(step)
            group = []
            for _ in range(size):
                sample = next(it, _END)
                if sample is _END:
                    raise self._exhausted(step, it)
                group.append(sample)
            if i == len(sizes) - 1:
                rest = (step + 1) * self._g - it.position
                if it.skip(rest) < rest:
                    raise self._exhausted(step, it)
            yield group

    def _seek(self, position: int, step: int) -> SampleIterator:
        it = self._it
        if it is None or it.position > position:  # not open yet in this entry
            it = self._it = self._stream.open(position)
            if it.position < position:
                raise self._exhausted(step, it)
        elif it.skip(position - it.position) < position - it.position:
            raise self._exhausted(step, it)
        return it

    def _check_current(self, step: int) -> None:
        if self.last_step != step:  # a later step was asked for before this one was read: they share the iterator
            raise StepOrderError(step, self.last_step)

    def _exhausted(self, step: int, it: SampleIterator) -> StreamExhausted:
        return StreamExhausted(step, it.position, self._g, exact=getattr(it, "exact", True))


def collated(groups: Iterator[list[Any]], collate_fn: Callable[[list[Any]], Any]) -> Iterator[Any]:
    """Collate each group as it is read."""
    for group in groups:
        yield collate_fn(group)
