"""Runs of the toy task shared by the integration and fault tiers, and the check every run must pass."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import elastictrain as et
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyDataset, ToyTask, make_model, make_train_fn, reference_params

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
    hold_at: Optional[int] = None,
    on_step=None,
) -> et.Result:
    """Train the toy task. With `hold_at`, the first world waits for all its workers and holds its loop at that
    step until a callback has injected a fault: a fault a callback fires at an earlier step lands mid-run in a
    whole world however slowly this machine runs (no race against the step count). `on_step` replaces that
    hold (it is called at every step of every rank)."""
    if hold_at is not None:
        on_step = on_step or hold_until_faults(hold_at)
        failure = failure.model_copy(update={"startup_wait_s": 120.0})
    return et.ElasticTrainer(
        make_train_fn(task, on_step=on_step),
        scaling=et.ScalingConfig(min_workers=workers[0], max_workers=workers[1], label_selector=label_selector),
        batch=BATCH,
        checkpoint=checkpoint,
        failure=failure,
        callbacks=list(callbacks),
    ).fit()


# Float32 distance allowed from the plain-torch reference: it sums each step's loss over the whole
# global batch in one forward, the runtime over micro-batches and ranks, so gradients differ in the
# last bits (about 1e-7 relative); 30 AdamW steps at lr=0.01 move each weight by at most 0.3, and the
# rounding differences measured here stay under 1e-6. A normalisation error moves weights by 1e-3 or more.
INDEPENDENT_ATOL = 2e-5


def global_batch_indices(num_samples: int, step: int, batch: et.BatchConfig) -> np.ndarray:
    """Dataset indices of global step `step`, written from the documented data-order contract alone.

    Step s takes positions [s*G, (s+1)*G) of a stream of per-epoch permutations; epoch e is
    numpy's PCG64 seeded with SeedSequence([seed, e]) permuting range(num_samples). With drop_last
    each epoch holds num_samples // G whole steps and the rest of its permutation is skipped.
    """
    g = batch.global_batch_size

    def order(epoch: int) -> np.ndarray:
        if not batch.shuffle:
            return np.arange(num_samples)
        seed = np.random.SeedSequence([batch.seed % 2**64, epoch])
        return np.random.Generator(np.random.PCG64(seed)).permutation(num_samples)

    if batch.drop_last:
        per_epoch = num_samples // g
        epoch, within = divmod(step, per_epoch)
        return order(epoch)[within * g : (within + 1) * g]
    positions = np.arange(step * g, (step + 1) * g)
    return np.array([order(int(p // num_samples))[p % num_samples] for p in positions])


def independent_reference_params(task: ToyTask, batch: et.BatchConfig = BATCH) -> torch.Tensor:
    """The final parameters by plain torch, without elastictrain's sampler or accumulator.

    Each step: the whole global batch in one forward, masked squared error summed over it and
    divided by its total item count, one backward, one AdamW step.
    """
    torch.manual_seed(task.seed)
    data = ToyDataset(task)
    model = make_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    for step in range(task.total_steps):
        idx = torch.from_numpy(global_batch_indices(len(data), step, batch))
        x, y, mask = data.x[idx], data.y[idx], data.mask[idx]
        opt.zero_grad()
        loss = (((model(x) - y) ** 2) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_matches_one_process(result: et.Result, task: ToyTask) -> None:
    """All steps ran, and the final parameters are those of an uninterrupted one-process run: the library's
    reference (same accumulator, so same rounding) and an independent plain-torch one (catches a wrong
    normalisation or data order that the library's reference would share)."""
    assert result.steps == task.total_steps
    params = torch.tensor(result.metrics["params"])
    torch.testing.assert_close(params, independent_reference_params(task, BATCH), atol=INDEPENDENT_ATOL, rtol=0,
                               msg=lambda m: f"differs from the plain-torch reference: {m}")
    torch.testing.assert_close(params, reference_params(task, BATCH), atol=2e-5, rtol=0)


def kinds(result: et.Result) -> list[str]:
    return [e["kind"] for e in result.events]
