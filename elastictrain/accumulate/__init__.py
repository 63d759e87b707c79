"""Gradient accumulation: batch plan (pure), elastic data order, streams, accumulator, device prefetch."""

from __future__ import annotations

from elastictrain.accumulate.accumulator import AccumulationStep, GradAccumulator
from elastictrain.accumulate.plan import RankPlan, plan_rank, plan_world, split_batch
from elastictrain.accumulate.prefetch import prefetch_to_device
from elastictrain.accumulate.sampler import MicroBatches, epoch_permutation, micro_batches, sample_indices
from elastictrain.accumulate.stream import ShardStream, Stream, as_stream

__all__ = [
    "AccumulationStep",
    "GradAccumulator",
    "MicroBatches",
    "RankPlan",
    "ShardStream",
    "Stream",
    "as_stream",
    "epoch_permutation",
    "micro_batches",
    "plan_rank",
    "plan_world",
    "prefetch_to_device",
    "sample_indices",
    "split_batch",
]
