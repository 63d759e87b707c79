"""The transfer plan: every byte of every tensor travels once, in messages no larger than a bucket."""

from __future__ import annotations

import pytest

from elastictrain.runtime.transfer import plan_messages


def _covered(sizes, messages):
    seen = {i: [] for i in range(len(sizes))}
    for m in messages:
        assert 0 < m.nbytes
        end = 0
        for p in m.pieces:
            assert p.at == end  # packed end to end
            end += p.nbytes
            seen[p.tensor].append((p.start, p.nbytes))
        assert end == m.nbytes
    for i, size in enumerate(sizes):
        spans = sorted(seen[i])
        pos = 0
        for start, n in spans:
            assert start == pos
            pos += n
        assert pos == size


@pytest.mark.parametrize("sizes", [[], [0, 0], [1] * 1000, [100], [10, 250, 3, 0, 99, 64, 7], [64] * 9 + [1]])
def test_every_byte_travels_once_within_the_bucket(sizes):
    messages = plan_messages(sizes, bucket_bytes=64, direct_bytes=16)
    _covered(sizes, messages)
    assert all(m.nbytes <= 64 for m in messages)


def test_small_tensors_are_packed_and_large_ones_split():
    messages = plan_messages([4] * 2000 + [1000], bucket_bytes=400, direct_bytes=100)
    packed = [m for m in messages if not m.direct]
    assert len(packed) == 20 and all(m.nbytes == 400 for m in packed)
    direct = [m.nbytes for m in messages if m.direct]
    assert direct == [400, 400, 200]
    assert all(len(m.pieces) == 1 and m.pieces[0].tensor == 2000 for m in messages if m.direct)


def test_the_plan_depends_on_sizes_alone():
    sizes = [3, 70, 5, 5, 200, 1]
    assert plan_messages(sizes, bucket_bytes=64, direct_bytes=32) == plan_messages(list(sizes), bucket_bytes=64,
                                                                                   direct_bytes=32)
    with pytest.raises(ValueError):
        plan_messages(sizes, bucket_bytes=0, direct_bytes=1)
