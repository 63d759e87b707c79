"""The plain-torch reference of tests/toy_runs.py agrees with the library's one-process reference and data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastictrain.accumulate.sampler import sample_indices
from elastictrain.testing.toy import ToyTask, reference_params
from tests.toy_runs import BATCH, INDEPENDENT_ATOL, global_batch_indices, independent_reference_params


@pytest.mark.parametrize("batch", [BATCH, BATCH.model_copy(update={"drop_last": False, "seed": 5}),
                                   BATCH.model_copy(update={"shuffle": False})])
@pytest.mark.parametrize("world_size", [1, 3])
def test_data_order_follows_the_documented_contract(batch, world_size):
    for step in (0, 1, 20, 21, 22, 45):  # 512 // 24 = 21 steps per epoch: crosses epochs
        per_rank = [np.concatenate(sample_indices(512, step, rank=r, world_size=world_size, batch=batch))
                    for r in range(world_size)]
        assert np.array_equal(np.concatenate(per_rank), global_batch_indices(512, step, batch)), step


def test_library_reference_matches_plain_torch():
    """The library's one-process run (its accumulator, its sampler) normalises as one plain-torch step does."""
    task = ToyTask(total_steps=30)
    torch.testing.assert_close(reference_params(task, BATCH), independent_reference_params(task, BATCH),
                               atol=INDEPENDENT_ATOL, rtol=0)


def test_independent_reference_is_sensitive_to_normalisation():
    """A per-sample mean (the wrong divisor) ends far outside the tolerance: the check can fail."""
    task = ToyTask(total_steps=30)
    good = independent_reference_params(task, BATCH)
    torch.manual_seed(task.seed)
    from elastictrain.testing.toy import ToyDataset, make_model

    data, model = ToyDataset(task), make_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    for step in range(task.total_steps):
        idx = torch.from_numpy(global_batch_indices(len(data), step, BATCH))
        x, y, mask = data.x[idx], data.y[idx], data.mask[idx]
        opt.zero_grad()
        per_sample = (((model(x) - y) ** 2) * mask).sum(1) / mask.sum(1)
        per_sample.mean().backward()
        opt.step()
    wrong = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (wrong - good).abs().max() > 50 * INDEPENDENT_ATOL
