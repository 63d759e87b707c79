"""DataLoader worker processes give exactly the batches of num_workers=0, and none outlives its entry."""

from __future__ import annotations

import multiprocessing
import os
import types

import pytest
import torch

from elastictrain.accumulate.feeds import DataFeeds
from elastictrain.accumulate.stream import ShardStream
from elastictrain.config import BatchConfig
from elastictrain.errors import StepOrderError, StreamExhausted
from tests.conftest import _wait_for

BATCH = BatchConfig(global_batch_size=12, micro_batch_size=4, seed=5)
N = 150


def _sample(i):
    return torch.full((3,), float(i)), i


def _shards():
    return ([_sample(i) for i in range(lo, min(lo + 20, N))] for lo in range(0, N, 20))


def _hf_stream():
    import datasets  # the test extra

    return datasets.Dataset.from_dict({"x": [[float(i)] * 3 for i in range(N)], "id": list(range(N))}) \
        .to_iterable_dataset(num_shards=3)  # with_format("torch") would start tqdm's monitor thread


def _sources():
    return {
        "map-style": [_sample(i) for i in range(N)],
        "shard stream": ShardStream(_shards, lengths=[20] * 7 + [10]),
        "shuffled stream": ShardStream(_shards).shuffled(window=25, seed=1),
        "hugging face stream": _hf_stream(),
    }


def _steps(source, steps, *, world, rank, workers):
    feeds = DataFeeds()
    try:
        return [list(feeds.micro_batches(source, s, rank=rank, world_size=world, batch=BATCH, num_workers=workers))
                for s in steps]
    finally:
        feeds.close()


def _no_children(deadline_s=10.0):
    """Worker processes of this test process that are still alive after close (polled with a deadline)."""
    _wait_for(lambda: not multiprocessing.active_children(), timeout=deadline_s)
    return multiprocessing.active_children()


@pytest.mark.parametrize("name", sorted(_sources()))
def test_two_workers_give_the_batches_of_none_in_the_same_order(name):
    source = _sources()[name]
    for world, rank, steps in ((1, 0, [0, 1, 2, 3, 4]), (3, 2, [3, 4, 5, 6, 7])):  # 8 is the stream's last step
        inline = _steps(source, steps, world=world, rank=rank, workers=0)
        loaded = _steps(source, steps, world=world, rank=rank, workers=2)
        assert len(loaded) == len(inline) == len(steps)
        for a, b in zip(inline, loaded):
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert type(x) is type(y)
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert _no_children() == []


def test_workers_stop_when_the_entry_ends_and_the_next_entry_resumes_at_its_step():
    source = ShardStream(_shards, lengths=[20] * 7 + [10])
    feeds = DataFeeds()
    first = [list(feeds.micro_batches(source, s, rank=0, world_size=2, batch=BATCH, num_workers=2)) for s in (0, 1)]
    pids = feeds._feeds[id(source)].steps.worker_pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    feeds.close()  # what the runner does when train_fn's entry ends (a world change)
    assert _no_children() == [] and not any(_alive(p) for p in pids)
    # the next entry: another world size, resuming at step 2, exactly as an uninterrupted single process
    ranks = [DataFeeds() for _ in range(3)]  # one process per rank, each with its entry's feeds
    resumed = [list(ranks[r].micro_batches(source, 2, rank=r, world_size=3, batch=BATCH, num_workers=2))
               for r in range(3)]
    for feeds in ranks:
        feeds.close()
    ids = [int(i) for part in resumed for _, idx in part for i in idx]
    assert ids == list(range(24, 36))
    assert [int(i) for _, idx in first[1] for i in idx] == list(range(12, 18))
    assert _no_children() == []


def test_the_context_closes_its_workers_when_the_runner_ends_the_entry():
    from elastictrain.runtime.context import Context

    session = types.SimpleNamespace(batch=BATCH)
    world = types.SimpleNamespace(rank=1, world_size=2, term=3, is_leader=False, member_id="m1")
    ctx = Context(session, world, torch.device("cpu"))
    source = ShardStream(_shards, lengths=[20] * 7 + [10])
    got = [list(ctx.micro_batches(source, s, num_workers=2)) for s in (4, 5)]
    assert [int(i) for _, idx in got[1] for i in idx] == list(range(66, 72))
    assert len(multiprocessing.active_children()) == 2
    ctx._close_data()
    assert _no_children() == []


def test_a_skipped_step_restarts_the_workers_and_a_step_back_is_refused():
    source = [_sample(i) for i in range(N)]
    feeds = DataFeeds()
    try:
        batches = lambda s: list(feeds.micro_batches(source, s, rank=0, world_size=1, batch=BATCH, num_workers=2))  # noqa: E731
        batches(0)
        later = batches(5)  # the workers were loading steps 1, 2, ...: they start again at 5
        assert [x[1].tolist() for x in later] == [x[1].tolist() for x in _steps(source, [5], world=1, rank=0,
                                                                                  workers=0)[0]]
        with pytest.raises(StepOrderError, match="step 5 after step 5"):
            batches(5)
    finally:
        feeds.close()
    assert _no_children() == []


def test_the_end_of_the_stream_is_raised_at_its_step_through_the_workers():
    source = ShardStream(_shards, lengths=[20] * 7 + [10])  # 150 samples: steps 0..11 whole
    feeds = DataFeeds()
    try:
        for s in range(10, 12):
            feeds.micro_batches(source, s, rank=1, world_size=2, batch=BATCH, num_workers=2)
        with pytest.raises(StreamExhausted, match="step 12") as info:
            feeds.micro_batches(source, 12, rank=1, world_size=2, batch=BATCH, num_workers=2)
        assert info.value.available == 150
    finally:
        feeds.close()
    assert _no_children() == []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running: the parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
