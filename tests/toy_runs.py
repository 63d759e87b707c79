"""Runs of the toy task shared by the integration and fault tiers, and the check every run must pass."""

from __future__ import annotations

from typing import Optional

import torch

import elastictrain as et
from elastictrain.toy import ToyTask, make_train_fn, reference_params

BATCH = et.BatchConfig(global_batch_size=24, micro_batch_size=4)
FAILURE = et.FailureConfig(collective_timeout_s=4, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5)


def fit_toy(
    task: ToyTask,
    *,
    workers: tuple[int, int] = (2, 3),
    callbacks=(),
    failure: et.FailureConfig = FAILURE,
    checkpoint: Optional[et.CheckpointConfig] = None,
    label_selector: Optional[dict] = None,
) -> et.Result:
    return et.ElasticTrainer(
        make_train_fn(task),
        scaling=et.ScalingConfig(min_workers=workers[0], max_workers=workers[1], label_selector=label_selector),
        batch=BATCH,
        checkpoint=checkpoint,
        failure=failure,
        callbacks=list(callbacks),
    ).fit()


def assert_matches_one_process(result: et.Result, task: ToyTask) -> None:
    """All steps ran, and the final parameters are those of an uninterrupted one-process run."""
    assert result.steps == task.total_steps
    torch.testing.assert_close(torch.tensor(result.metrics["params"]), reference_params(task, BATCH), atol=2e-5, rtol=0)


def kinds(result: et.Result) -> list[str]:
    return [e["kind"] for e in result.events]
