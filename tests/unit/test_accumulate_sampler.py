"""Elastic data order: a step's samples depend on (seed, step) only, never on the world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.accumulate.sampler import epoch_permutation, micro_batches, sample_indices
from elastictrain.config import BatchConfig


def _global_batch(n, step, world, batch):
    return np.concatenate(
        [g for r in range(world) for g in sample_indices(n, step, rank=r, world_size=world, batch=batch)]
    )


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 300), g=st.integers(1, 40), m=st.integers(1, 40), step=st.integers(0, 50),
    w1=st.integers(1, 8), w2=st.integers(1, 8), drop_last=st.booleans(), seed=st.integers(-5, 5),
)
def test_global_batch_is_the_same_at_any_world_size(n, g, m, step, w1, w2, drop_last, seed):
    m = min(m, g)
    if g < max(w1, w2) or (drop_last and n < g):
        return
    batch = BatchConfig(global_batch_size=g, micro_batch_size=m, seed=seed, drop_last=drop_last)
    a = _global_batch(n, step, w1, batch)
    b = _global_batch(n, step, w2, batch)
    assert a.tolist() == b.tolist()
    assert len(a) == g


def test_drop_last_epoch_is_a_permutation_without_repeats():
    n, g = 50, 8  # 6 whole steps per epoch, 2 samples skipped each epoch
    batch = BatchConfig(global_batch_size=g, micro_batch_size=3, seed=7)
    for epoch in range(3):
        seen = np.concatenate([_global_batch(n, epoch * 6 + s, 3, batch) for s in range(6)])
        assert len(set(seen.tolist())) == 48
        assert seen.tolist() == epoch_permutation(n, epoch, seed=7)[:48].tolist()
    assert epoch_permutation(n, 0, seed=7).tolist() != epoch_permutation(n, 1, seed=7).tolist()


def test_without_drop_last_batches_straddle_epochs_and_cover_each_epoch_once():
    n, g = 10, 4
    batch = BatchConfig(global_batch_size=g, micro_batch_size=4, seed=3, drop_last=False)
    stream = np.concatenate([_global_batch(n, s, 2, batch) for s in range(5)])  # 20 samples = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert stream[:10].tolist() == epoch_permutation(n, 0, seed=3).tolist()


def test_no_shuffle_keeps_dataset_order():
    batch = BatchConfig(global_batch_size=6, micro_batch_size=2, shuffle=False)
    assert _global_batch(20, 2, 3, batch).tolist() == list(range(12, 18))


def test_seed_changes_the_order_and_is_reproducible():
    a = epoch_permutation(100, 0, seed=1)
    assert a.tolist() == epoch_permutation(100, 0, seed=1).tolist()
    assert a.tolist() != epoch_permutation(100, 0, seed=2).tolist()
    assert not a.flags.writeable


def test_micro_batches_collates_and_reports_k():
    data = [(torch.tensor([float(i)]), i) for i in range(30)]
    batch = BatchConfig(global_batch_size=10, micro_batch_size=2, shuffle=False)
    it = micro_batches(data, 1, rank=1, world_size=3, batch=batch)
    assert len(it) == it.plan.num_micro_batches == 2
    got = list(it)
    assert [b[1].tolist() for b in got] == [[14, 15], [16]]
    assert got[0][0].shape == (2, 1)


def test_custom_collate_and_cpu_device_pass_through():
    batch = BatchConfig(global_batch_size=4, micro_batch_size=4, shuffle=False)
    got = list(micro_batches(list(range(8)), 1, rank=0, world_size=1, batch=batch, collate_fn=list, device="cpu"))
    assert got == [[4, 5, 6, 7]]


def test_dataset_smaller_than_global_batch_is_a_clear_error():
    batch = BatchConfig(global_batch_size=16, micro_batch_size=4)
    with pytest.raises(ValueError, match="drop_last=False"):
        sample_indices(10, 0, rank=0, world_size=1, batch=batch)
    with pytest.raises(ValueError, match="empty"):
        sample_indices(0, 0, rank=0, world_size=1, batch=batch)


def test_tensor_dataset_micro_batches_are_gathered_per_tensor_and_equal_stacked_rows(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 9, (40,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    batch = BatchConfig(global_batch_size=12, micro_batch_size=4, seed=3)
    rows = micro_batches(list(zip(x, y)), 2, rank=1, world_size=2, batch=batch)  # a list: collated row by row
    expected = list(rows)
    calls = []
    original = torch.utils.data.TensorDataset.__getitem__
    monkeypatch.setattr(torch.utils.data.TensorDataset, "__getitem__",
                        lambda self, i: calls.append(i) or original(self, i))
    got = list(micro_batches(data, 2, rank=1, world_size=2, batch=batch))
    assert calls == []  # no sample fetched one at a time
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert type(a) is type(b) and len(a) == len(b) == 2
        assert all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b))


def test_tensor_dataset_subclass_and_custom_collate_keep_the_row_path():
    class Doubled(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            return tuple(t[i] * 2 for t in self.tensors)

    x = torch.arange(8.0).reshape(8, 1)
    batch = BatchConfig(global_batch_size=4, micro_batch_size=4, shuffle=False)
    got = list(micro_batches(Doubled(x), 1, rank=0, world_size=1, batch=batch))
    assert got[0][0].flatten().tolist() == [8.0, 10.0, 12.0, 14.0]
    rows = list(micro_batches(torch.utils.data.TensorDataset(x), 1, rank=0, world_size=1, batch=batch, collate_fn=list))
    assert len(rows[0]) == 4 and isinstance(rows[0][0], tuple)
