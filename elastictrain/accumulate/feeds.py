"""The data feeds of one entry of train_fn: open streams and DataLoader workers, closed when it ends.

A map-style dataset without workers needs no feed (its steps are pure index maths).
A stream keeps one open iterator and DataLoader workers keep running from step to
step within an entry; a world change ends the entry, ``close`` stops them, and the next
entry opens its feeds at its first step, with the new rank's slice.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from elastictrain.accumulate.loader import WorkerSteps
from elastictrain.accumulate.plan import RankPlan, plan_rank
from elastictrain.accumulate.sampler import default_collate, micro_batches, sample_indices
from elastictrain.accumulate.stream import Stream, as_stream
from elastictrain.accumulate.stream_steps import StreamSteps, collated
from elastictrain.config import BatchConfig


class StepBatches:
    """Iterator over this rank's collated micro-batches of one step; ``len()`` is k, ``.plan`` the share."""

    def __init__(self, batches: Iterator[Any], plan: RankPlan, device: Any = None):
        self.plan = plan
        self._batches = batches
        self._device = device
        self._iter: Optional[Iterator[Any]] = None

    def __len__(self) -> int:
        return self.plan.num_micro_batches

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            from elastictrain.accumulate.prefetch import prefetch_to_device

            self._iter = prefetch_to_device(self._batches, self._device)
        return next(self._iter)


class _Feed:
    def __init__(self, source: Any, stream: Optional[Stream], plan: RankPlan, batch: BatchConfig,
                 collate_fn: Callable, num_workers: int, prefetch_factor: int):
        self.source = source  # held so that its id stays this feed's key
        self.config = (plan, num_workers, prefetch_factor)
        if num_workers:
            self.steps: Any = WorkerSteps(None if stream is not None else source, stream, plan, batch,
                                          collate_fn, num_workers, prefetch_factor)
        else:
            self.steps = StreamSteps(stream, plan, batch.global_batch_size)

    def close(self) -> None:
        close = getattr(self.steps, "close", None)
        if close is not None:
            close()


class DataFeeds:
    """The feeds of one entry of train_fn, one per source."""

    def __init__(self) -> None:
        self._feeds: dict[int, _Feed] = {}

    def micro_batches(
        self,
        source: Any,
        step: int,
        *,
        rank: int,
        world_size: int,
        batch: BatchConfig,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        device: Any = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
    ) -> Any:
        """This rank's micro-batches of ``step`` from ``source`` (see ``Context.micro_batches``)."""
        stream = as_stream(source)
        collate_fn = collate_fn or default_collate
        if stream is None and not num_workers:
            return micro_batches(source, step, rank=rank, world_size=world_size, batch=batch,
                                 collate_fn=collate_fn, device=device)
        plan = plan_rank(batch.global_batch_size, batch.micro_batch_size, world_size, rank)
        if stream is None:  # checks the dataset and the step here, before any worker starts
            sample_indices(len(source), step, rank=rank, world_size=world_size, batch=batch)
        feed = self._feeds.get(id(source))
        if feed is not None and feed.config != (plan, num_workers, prefetch_factor):
            last = feed.steps.last_step
            feed.close()
            feed = None
        else:
            last = None
        if feed is None:
            feed = _Feed(source, stream, plan, batch, collate_fn, num_workers, prefetch_factor)
            feed.steps.last_step = last  # a changed setting does not let steps go back
            self._feeds[id(source)] = feed
        if num_workers:
            return StepBatches(iter(feed.steps.batches(step)), plan, device)
        # without workers the call's collate_fn is used as given (a lambda per call is fine)
        return StepBatches(collated(feed.steps.groups(step), collate_fn), plan, device)

    def close(self) -> None:
        """Stop every worker process and drop every open stream."""
        feeds, self._feeds = self._feeds, {}
        for feed in feeds.values():
            feed.close()
