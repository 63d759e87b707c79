"""Gradient accumulation: batch plan (pure), elastic data order, accumulator, device prefetch."""

from __future__ import annotations

from elastictrain.accumulate.accumulator import AccumulationStep, GradAccumulator
from elastictrain.accumulate.plan import RankPlan, plan_rank, plan_world
from elastictrain.accumulate.prefetch import prefetch_to_device
from elastictrain.accumulate.sampler import MicroBatches, epoch_permutation, micro_batches, sample_indices

__all__ = [
    "AccumulationStep",
    "GradAccumulator",
    "MicroBatches",
    "RankPlan",
    "epoch_permutation",
    "micro_batches",
    "plan_rank",
    "plan_world",
    "prefetch_to_device",
    "sample_indices",
]
