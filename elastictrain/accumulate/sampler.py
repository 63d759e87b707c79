"""Elastic data order: the samples of global step s are a function of (seed, s) only.

Step s consumes positions ``[s*G, (s+1)*G)`` of a stream made of seeded per-epoch
permutations of the dataset; each rank takes its plan's slice of that window. So
a run that loses or gains workers sees exactly the batches an uninterrupted run
sees, and the data position needs no saving beyond the step number.

``sample_indices`` is pure (numpy only); ``micro_batches`` adds the dataset reads,
the collate function and the optional copy to a device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from elastictrain.accumulate.plan import RankPlan, plan_rank
from elastictrain.config import BatchConfig

_SEED_MASK = (1 << 64) - 1


@functools.lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    # Cached because every micro-batch of every step of an epoch reads the same one;
    # read-only so a caller cannot corrupt the order of later steps.
    if shuffle:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & _SEED_MASK, epoch])))
        order = rng.permutation(num_samples)
    else:
        order = np.arange(num_samples)
    order.setflags(write=False)
    return order


def epoch_permutation(num_samples: int, epoch: int, *, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """The order of the dataset in one epoch: a seeded permutation, or dataset order without shuffle.

    Args:
        num_samples: ``len(dataset)``.
        epoch: Epoch number, from 0.
        seed: Run seed; the same (seed, epoch) gives the same order on every host.
        shuffle: False keeps dataset order.

    Returns:
        A read-only int64 array of the dataset indices in epoch order.
    """
    return _permutation(num_samples, seed, epoch, shuffle)


def steps_per_epoch(num_samples: int, batch: BatchConfig) -> Optional[int]:
    """Whole optimizer steps per epoch with ``drop_last``; None when batches straddle epochs.

    Raises:
        ValueError: ``drop_last`` is on and the dataset holds fewer samples than one global batch.
    """
    if not batch.drop_last:
        return None
    steps = num_samples // batch.global_batch_size
    if steps == 0:
        raise ValueError(
            f"the dataset holds {num_samples} samples, fewer than global_batch_size="
            f"{batch.global_batch_size}: lower global_batch_size or set drop_last=False"
        )
    return steps


def global_positions(step: int, plan: RankPlan, batch: BatchConfig) -> np.ndarray:
    """Positions in the epoch stream of this rank's samples of global step ``step``."""
    if step < 0:
        raise ValueError(f"step={step} must be 0 or more")
    base = step * batch.global_batch_size
    return np.arange(base + plan.start, base + plan.stop, dtype=np.int64)


def sample_indices(
    num_samples: int, step: int, *, rank: int, world_size: int, batch: BatchConfig
) -> list[np.ndarray]:
    """Dataset indices of each of this rank's micro-batches of global step ``step``.

    With ``drop_last`` (the default) epoch e holds steps ``[e*S, (e+1)*S)`` with
    ``S = len // G`` and the last ``len % G`` samples of each permutation are skipped;
    without it the stream is the concatenation of the epoch permutations and a
    global batch may straddle two epochs. Either way the indices depend on
    (seed, step) and the rank's slice only.

    Args:
        num_samples: ``len(dataset)``; at least 1.
        step: Global step, from 0.
        rank: This rank in the current world.
        world_size: Ranks alive in the current world.
        batch: Global and micro batch sizes, seed, shuffle and drop_last.

    Returns:
        One int64 array per micro-batch, in order; their lengths are ``plan.micro_sizes``.

    Raises:
        ValueError: the dataset is empty, or smaller than one global batch with drop_last,
            or G < world_size, or ``step`` is negative.
    """
    if num_samples < 1:
        raise ValueError("the dataset is empty: micro_batches needs at least one sample")
    plan = plan_rank(batch.global_batch_size, batch.micro_batch_size, world_size, rank)
    positions = global_positions(step, plan, batch)
    per_epoch = steps_per_epoch(num_samples, batch)
    if per_epoch is not None:
        epoch = step // per_epoch
        offsets = positions - epoch * per_epoch * batch.global_batch_size
        indices = epoch_permutation(num_samples, epoch, seed=batch.seed, shuffle=batch.shuffle)[offsets]
    else:
        epochs, offsets = np.divmod(positions, num_samples)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            order = epoch_permutation(num_samples, int(epoch), seed=batch.seed, shuffle=batch.shuffle)
            indices[mask] = order[offsets[mask]]
    bounds = np.cumsum(plan.micro_sizes)[:-1]
    return list(np.split(indices, bounds))


def default_collate(samples: Sequence[Any]) -> Any:
    """torch's default collate (stacks tensors, numbers and nested containers)."""
    from torch.utils.data import default_collate as collate

    return collate(samples)


def _tensor_columns(dataset: Any) -> Optional[tuple]:
    """The tensors of a plain `TensorDataset` (not a subclass, whose `__getitem__` may differ), else None."""
    from torch.utils.data import TensorDataset

    return dataset.tensors if type(dataset) is TensorDataset else None


class MicroBatches:
    """Iterator over this rank's collated micro-batches of one global step; ``len()`` is k.

    Built by ``micro_batches``; ``plan`` holds the rank's share of the step.
    """

    def __init__(
        self,
        dataset: Any,
        index_groups: list[np.ndarray],
        plan: RankPlan,
        collate_fn: Callable[[list[Any]], Any],
        device: Any = None,
    ):
        self.plan = plan
        self.indices = index_groups
        self._dataset = dataset
        self._collate = collate_fn
        self._device = device
        self._iter: Optional[Iterator[Any]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def _collated(self) -> Iterator[Any]:
        tensors = _tensor_columns(self._dataset) if self._collate is default_collate else None
        for group in self.indices:
            if tensors is not None:  # one gather per tensor: what stacking the rows gives, without a row at a time
                index = torch.from_numpy(np.asarray(group, dtype=np.int64))
                yield [t[index] for t in tensors]
            else:
                yield self._collate([self._dataset[int(i)] for i in group])

    def __iter__(self) -> "MicroBatches":
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            from elastictrain.accumulate.prefetch import prefetch_to_device

            self._iter = prefetch_to_device(self._collated(), self._device)
        return next(self._iter)


def micro_batches(
    dataset: Any,
    step: int,
    *,
    rank: int,
    world_size: int,
    batch: BatchConfig,
    collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    device: Any = None,
) -> MicroBatches:
    """This rank's collated micro-batches of global step ``step`` of a map-style dataset.

    Args:
        dataset: Map-style: ``len(dataset)`` and ``dataset[i]`` for ``0 <= i < len``.
        step: Global step, from 0; the only data position a checkpoint needs.
        rank: This rank in the current world.
        world_size: Ranks alive in the current world.
        batch: Global and micro batch sizes, seed, shuffle and drop_last.
        collate_fn: Turns a list of samples into a batch; torch's ``default_collate`` if None.
        device: Where batches go. CUDA: collated into pinned memory and copied with
            ``non_blocking`` on a side stream, the next one prefetched. None or CPU:
            batches are yielded as collated.

    Returns:
        An iterator of collated micro-batches; ``len()`` is the k to give
        ``GradAccumulator.step``, ``.plan`` the rank's plan.

    Raises:
        ValueError: as ``sample_indices``.

    Example:
        >>> cfg = BatchConfig(global_batch_size=8, micro_batch_size=2)
        >>> it = micro_batches(list(range(100)), 3, rank=0, world_size=2, batch=cfg)
        >>> len(it)
        2
    """
    groups = sample_indices(len(dataset), step, rank=rank, world_size=world_size, batch=batch)
    plan = plan_rank(batch.global_batch_size, batch.micro_batch_size, world_size, rank)
    return MicroBatches(dataset, groups, plan, collate_fn or default_collate, device)
