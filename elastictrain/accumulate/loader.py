"""This rank's micro-batches loaded in DataLoader worker processes, step by step, with prefetch.

Worker w of N loads whole steps ``start + w, start + w + N, ...``; the DataLoader hands
items back in the order it asked for them (worker 0, 1, ..., N-1, 0, ...), so the
steps come out in order with exactly the batches of ``num_workers=0``. An item is one
step: the list of this rank's collated micro-batches. With a stream each worker reads
the stream and skips the other workers' steps (whole shards of known length are
skipped unread). A data error in a worker travels as the item of its step and is raised
when that step is asked for.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch

from elastictrain.accumulate.plan import RankPlan
from elastictrain.accumulate.sampler import sample_indices
from elastictrain.accumulate.stream import Stream
from elastictrain.accumulate.stream_steps import StreamSteps
from elastictrain.config import BatchConfig
from elastictrain.errors import DataError, StepOrderError


class _StepItems(torch.utils.data.IterableDataset):
    """(step, micro-batches or the step's DataError) for this worker's steps from ``start`` on."""

    def __init__(self, dataset: Any, stream: Optional[Stream], plan: RankPlan, batch: BatchConfig,
                 collate_fn: Callable[[list[Any]], Any], start: int):
        self.dataset, self.stream, self.plan, self.batch = dataset, stream, plan, batch
        self.collate_fn, self.start = collate_fn, start

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + worker
        if self.stream is not None:
            steps = StreamSteps(self.stream, self.plan, self.batch.global_batch_size)
        while True:
            try:
                if self.stream is not None:
                    batches = [self.collate_fn(group) for group in steps.groups(step)]
                else:
                    groups = sample_indices(len(self.dataset), step, rank=self.plan.rank,
                                            world_size=self.plan.world_size, batch=self.batch)
                    batches = [self.collate_fn([self.dataset[int(i)] for i in g]) for g in groups]
            except DataError as exc:
                yield step, exc
                return
            yield step, batches
            step += workers


def _as_is(item: Any) -> Any:
    return item  # the default would convert numpy arrays inside the batches; keep them as collated


class WorkerSteps:
    """A DataLoader over this rank's steps; re-started when a step is skipped, shut down by ``close``.

    Args:
        dataset: A map-style dataset, or None with ``stream``.
        stream: The stream source, or None for a map-style dataset.
        plan: This rank's share of every global batch.
        batch: Batch sizes, seed and shuffle of the map-style order.
        collate_fn: Turns a list of samples into a batch; runs in the workers.
        num_workers: Worker processes, at least 1.
        prefetch_factor: Steps each worker loads ahead.
    """

    def __init__(self, dataset: Any, stream: Optional[Stream], plan: RankPlan, batch: BatchConfig,
                 collate_fn: Callable[[list[Any]], Any], num_workers: int, prefetch_factor: int = 2):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 1 (0 loads in this process)")
        if isinstance(prefetch_factor, bool) or not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={prefetch_factor!r} must be an int >= 1")
        self._args = (dataset, stream, plan, batch, collate_fn)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self._iter: Optional[Iterator[tuple[int, Any]]] = None
        self._next_step: Optional[int] = None
        self.last_step: Optional[int] = None

    def batches(self, step: int) -> list[Any]:
        """This rank's collated micro-batches of ``step``.

        Raises:
            StepOrderError: ``step`` is not after the last step asked for.
            DataError: what reading the step raised in its worker (say, ``StreamExhausted``).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        if self.last_step is not None and step <= self.last_step:
            raise StepOrderError(step, self.last_step)
        self.last_step = step
        if self._iter is None or step != self._next_step:
            self._start(step)
        got, payload = next(self._iter)
        if got != step:  # the loader's order is the contract this module rests on
            raise RuntimeError(f"DataLoader workers returned step {got} where step {step} was due")
        self._next_step = step + 1
        if isinstance(payload, BaseException):
            self.close()
            raise payload
        return payload

    def _start(self, step: int) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(
            _StepItems(*self._args, start=step), batch_size=None, collate_fn=_as_is,
            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor, persistent_workers=False,
        )
        self._iter = iter(loader)

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (empty when none run)."""
        return [w.pid for w in getattr(self._iter, "_workers", [])]

    def close(self) -> None:
        """Shut the worker processes down and wait for them; the next ``batches`` starts new ones."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # joins the workers; a dropped iterator would leave it to the garbage collector
