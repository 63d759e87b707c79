"""Batch plan: exact tiling of the global batch at every world size, no torch.distributed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.accumulate.plan import RankPlan, plan_rank, plan_world, split_batch


@settings(max_examples=300, deadline=None)
@given(g=st.integers(1, 600), m=st.integers(1, 64), w=st.integers(1, 40))
def test_world_plan_tiles_global_batch_exactly(g, m, w):
    if g < w:
        with pytest.raises(ValueError):
            split_batch(g, m, w)
        return
    plans = split_batch(g, m, w)
    covered = [i for p in plans for lo, hi in p.micro_ranges() for i in range(lo, hi)]
    assert covered == list(range(g))  # no sample dropped, repeated or out of order
    for r, p in enumerate(plans):
        assert p.rank == r and p.world_size == w
        assert p.num_samples >= 1
        assert sum(p.micro_sizes) == p.num_samples
        assert all(1 <= s <= m for s in p.micro_sizes)
        assert p.num_micro_batches == len(p.micro_sizes) == -(-p.num_samples // m)
    sizes = [p.num_samples for p in plans]
    assert max(sizes) - min(sizes) <= 1  # balanced to within one sample


def test_uneven_split_gives_extra_samples_to_lowest_ranks():
    plans = split_batch(10, 2, 3)
    assert [(p.start, p.num_samples) for p in plans] == [(0, 4), (4, 3), (7, 3)]
    assert [p.micro_sizes for p in plans] == [(2, 2), (2, 1), (2, 1)]
    assert plans[1].micro_ranges() == ((4, 6), (6, 7))


def test_full_micro_batches_first_then_remainder():
    p = plan_rank(global_batch_size=19, micro_batch_size=4, world_size=1, rank=0)
    assert p.micro_sizes == (4, 4, 4, 4, 3)
    assert p.num_micro_batches == 5 and p.stop == 19


def test_plan_is_frozen_value():
    p = plan_rank(8, 2, 2, 1)
    assert p == RankPlan(rank=1, world_size=2, start=4, num_samples=4, micro_sizes=(2, 2))
    with pytest.raises(AttributeError):
        p.start = 0  # type: ignore[misc]


def test_global_batch_smaller_than_world_says_what_to_change():
    with pytest.raises(ValueError, match="raise global_batch_size to at least 5"):
        plan_rank(4, 1, 5, 0)


@pytest.mark.parametrize(
    "args, match",
    [((8, 2, 2, 2), "rank=2 is outside"), ((8, 2, 2, -1), "rank=-1"), ((0, 1, 1, 0), "global_batch_size"),
     ((8, 0, 1, 0), "micro_batch_size"), ((8, 1, 0, 0), "world_size"), ((10, 2, 2, 0.5), "rank=0.5"),
     ((10.0, 2, 2, 0), "must be an int"), ((10, True, 2, 0), "micro_batch_size=True")],
)
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        plan_rank(*args)


def test_old_name_plan_world_warns_and_gives_the_same_split():
    with pytest.warns(DeprecationWarning, match="split_batch"):
        assert plan_world(10, 2, 3) == split_batch(10, 2, 3)
