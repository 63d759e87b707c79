"""Batch plan: which slice of the global batch each rank runs, in which micro-batches.

Pure: values in, frozen values out. Recomputed on every rebuild, so it never
caches a rank or a world size. The split is exact for any global batch size G:
rank r gets ``G // W`` samples plus one more while ``r < G % W``, so the ranks'
slices tile ``[0, G)`` with no sample dropped or repeated, and no rank gets 0
samples as long as ``G >= W``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of a global batch.

    Attributes:
        rank: The rank this plan is for.
        world_size: The world size it was computed for.
        start: Offset of this rank's first sample inside the global batch.
        num_samples: How many consecutive samples of the global batch this rank runs.
        micro_sizes: Size of each micro-batch, in order; full micro-batches first,
            the remainder (if any) last. Sums to ``num_samples``.
    """

    rank: int
    world_size: int
    start: int
    num_samples: int
    micro_sizes: tuple[int, ...]

    @property
    def num_micro_batches(self) -> int:
        """How many forward/backward passes this rank runs in one step (k)."""
        return len(self.micro_sizes)

    @property
    def stop(self) -> int:
        """One past the offset of this rank's last sample inside the global batch."""
        return self.start + self.num_samples

    def micro_ranges(self) -> tuple[tuple[int, int], ...]:
        """Offsets ``(begin, end)`` of each micro-batch inside the global batch."""
        ranges = []
        begin = self.start
        for size in self.micro_sizes:
            ranges.append((begin, begin + size))
            begin += size
        return tuple(ranges)


def _check(global_batch_size: int, micro_batch_size: int, world_size: int) -> None:
    for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                        ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an int")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be at least 1")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be at least 1")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    if global_batch_size < world_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is smaller than world_size={world_size}, so some "
            f"rank would get no sample: raise global_batch_size to at least {world_size} "
            f"or lower max_workers to at most {global_batch_size}"
        )


def plan_rank(global_batch_size: int, micro_batch_size: int, world_size: int, rank: int) -> RankPlan:
    """Plan one rank's slice of the global batch and its micro-batches.

    Args:
        global_batch_size: Samples per optimizer step over all ranks (G).
        micro_batch_size: Largest number of samples in one forward/backward.
        world_size: Ranks alive in the current world (W).
        rank: This rank, ``0 <= rank < world_size``.

    Returns:
        The frozen plan; ``plan.num_micro_batches`` is the k to give ``GradAccumulator.step``.

    Raises:
        ValueError: a size is below 1, ``rank`` is out of range, or G < W (some rank
            would get no sample; the message says what to change).

    Example:
        >>> plan_rank(10, 4, 3, 0).micro_sizes   # 10 samples over 3 ranks: 4, 3, 3
        (4,)
        >>> plan_rank(10, 2, 3, 1).start, plan_rank(10, 2, 3, 1).micro_sizes
        (4, (2, 1))
    """
    _check(global_batch_size, micro_batch_size, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, {world_size}) for world_size={world_size}")
    base, extra = divmod(global_batch_size, world_size)
    num_samples = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    full, rest = divmod(num_samples, micro_batch_size)
    micro_sizes = (micro_batch_size,) * full + ((rest,) if rest else ())
    return RankPlan(rank=rank, world_size=world_size, start=start, num_samples=num_samples, micro_sizes=micro_sizes)


def split_batch(global_batch_size: int, micro_batch_size: int, world_size: int) -> tuple[RankPlan, ...]:
    """Split the global batch over every rank of a world of a world; the slices tile ``[0, global_batch_size)`` in rank order.

    Args:
        global_batch_size: Samples per optimizer step over all ranks (G).
        micro_batch_size: Largest number of samples in one forward/backward.
        world_size: Ranks alive in the current world (W).

    Returns:
        One ``RankPlan`` per rank, indexed by rank.

    Raises:
        ValueError: as ``plan_rank``.
    """
    return tuple(plan_rank(global_batch_size, micro_batch_size, world_size, r) for r in range(world_size))


def plan_world(global_batch_size: int, micro_batch_size: int, world_size: int) -> tuple[RankPlan, ...]:
    """Deprecated name of `split_batch` (the election's rank assignment is `election.policy.assign_ranks`)."""
    import warnings

    warnings.warn("elastictrain.accumulate.plan_world is now split_batch", DeprecationWarning, stacklevel=2)
    return split_batch(global_batch_size, micro_batch_size, world_size)
