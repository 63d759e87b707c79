"""Stream-fed steps: the union over ranks of step s is exactly stream[s*G:(s+1)*G], at any world size and
resume point, without re-reading from the start where shard lengths or `datasets`' skip allow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.accumulate.feeds import DataFeeds
from elastictrain.accumulate.stream import ShardStream, as_stream
from elastictrain.config import BatchConfig
from elastictrain.errors import ShardLengthMismatch, StepOrderError, StreamExhausted, UnsupportedSource

SHARD_SIZES = [7, 3, 12, 1, 9, 5, 11, 8, 4, 10]  # uneven on purpose: 70 samples
STREAM = list(range(sum(SHARD_SIZES)))


def _shards(sizes=SHARD_SIZES, opened=None):
    def make():
        start = 0
        for i, n in enumerate(sizes):
            yield _Shard(i, range(start, start + n), opened)
            start += n

    return make


class _Shard:
    """A lazy shard that notes when it is first read (a skipped shard is never read)."""

    def __init__(self, index, samples, opened):
        self.index, self.samples, self.opened = index, samples, opened

    def __iter__(self):
        if self.opened is not None:
            self.opened.append(self.index)
        return iter(self.samples)


def _sources():
    return {
        "shards with lengths": ShardStream(_shards(), lengths=SHARD_SIZES),
        "shards": ShardStream(_shards()),
        "some lengths": ShardStream(_shards(), lengths=SHARD_SIZES[:4]),
        "re-iterable": _Reiterable(STREAM),
    }


class _Reiterable:
    """Iterable afresh, with no len or [i]: read from its start on each open."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def _run_entry(source, world, steps, batch):
    """One entry of train_fn on every rank of a world: {step: samples of rank 0, then rank 1, ...}."""
    feeds = [DataFeeds() for _ in range(world)]
    try:
        return {
            s: [x for r in range(world)
                for mb in feeds[r].micro_batches(source, s, rank=r, world_size=world, batch=batch, collate_fn=list)
                for x in mb]
            for s in steps
        }
    finally:
        for f in feeds:
            f.close()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(_sources())), g=st.integers(4, 9), m=st.integers(1, 9),
       worlds=st.lists(st.integers(1, 4), min_size=1, max_size=3), starts=st.data())
def test_every_step_takes_its_window_of_the_stream_at_any_world_size_and_resume_point(name, g, m, worlds, starts):
    source = _sources()[name]
    batch = BatchConfig(global_batch_size=g, micro_batch_size=min(m, g))
    last = len(STREAM) // g - 1  # the last whole step
    step = starts.draw(st.integers(0, last))
    for world in worlds:  # a rebuild (or a restart) re-enters at the next step, on a fresh world
        steps = list(range(step, min(step + 3, last + 1)))
        if not steps:
            break
        got = _run_entry(source, world, steps, batch)
        for s in steps:
            assert got[s] == STREAM[s * g:(s + 1) * g], (world, s)
        step = steps[-1] + 1


def test_shuffled_stream_windows_are_permutations_and_open_anywhere():
    base = ShardStream(_shards(), lengths=SHARD_SIZES)
    stream = base.shuffled(window=16, seed=3)
    full = list(stream.open(0))
    assert len(full) == len(STREAM) and full != STREAM
    for k in range(0, len(STREAM), 16):
        assert sorted(full[k:k + 16]) == STREAM[k:k + 16]
    for position in (1, 15, 16, 17, 40, 69, 70):
        assert list(stream.open(position)) == full[position:]
    assert list(base.shuffled(window=16, seed=4).open(0)) != full
    batch = BatchConfig(global_batch_size=8, micro_batch_size=3)
    got = _run_entry(stream, 3, [2, 3, 4], batch)
    assert [got[s] for s in (2, 3, 4)] == [full[16:24], full[24:32], full[32:40]]
    small = base.shuffled(window=2, seed=3)  # ranks skip whole windows between their slices
    full = list(small.open(0))
    got = _run_entry(small, 3, [2, 3, 4], batch)
    assert [got[s] for s in (2, 3, 4)] == [full[16:24], full[24:32], full[32:40]]


def test_resume_skips_whole_shards_of_known_length_unread():
    opened = []
    source = ShardStream(_shards(opened=opened), lengths=SHARD_SIZES)
    batch = BatchConfig(global_batch_size=8, micro_batch_size=4)
    got = _run_entry(source, 2, [7], batch)  # positions 56..63: shards 8 (56..59) and 9 (60..69)
    assert got[7] == STREAM[56:64]
    assert sorted(set(opened)) == [8, 9], opened  # the 56 samples before them were never read


def test_consecutive_steps_of_an_entry_read_the_stream_once():
    calls, opened = [], []

    def shards():
        calls.append(1)
        return _shards(opened=opened)()

    feeds = DataFeeds()
    batch = BatchConfig(global_batch_size=8, micro_batch_size=4)
    for s in range(8):
        assert list(feeds.micro_batches(ShardStream(shards), s, rank=0, world_size=1, batch=batch,
                                        collate_fn=list)) != []
    # a new ShardStream object per call is a new source; the same object keeps its iterator open:
    feeds.close()
    stream = ShardStream(shards)
    calls.clear(), opened.clear()
    for s in range(8):
        list(feeds.micro_batches(stream, s, rank=1, world_size=2, batch=batch, collate_fn=list))
    assert len(calls) == 1 and opened == list(range(len(SHARD_SIZES)))  # each shard opened once, in order
    feeds.close()


def test_a_hugging_face_stream_resumes_exactly_at_any_world_size():
    import datasets  # the test extra: a skip here would hide the path

    def gen(shards):
        for lo, hi in shards:
            for i in range(lo, hi):
                yield {"id": i}

    bounds = [(0, 13), (13, 30), (30, 41), (41, 60)]
    from_generator = datasets.IterableDataset.from_generator(gen, gen_kwargs={"shards": bounds})
    arrow = datasets.Dataset.from_dict({"id": list(range(60))}).to_iterable_dataset(num_shards=4)
    batch = BatchConfig(global_batch_size=6, micro_batch_size=4)
    for ds in (from_generator, arrow):
        for world, steps in ((1, [0, 1]), (3, [4, 5, 6]), (4, [2]), (2, [9])):
            got = _run_entry(ds, world, steps, batch)
            for s in steps:
                assert [x["id"] for x in got[s]] == list(range(s * 6, s * 6 + 6)), (world, s)
    with pytest.raises(StreamExhausted, match="fewer than 60 samples"):
        _run_entry(arrow, 2, [10], batch)


def test_a_stream_that_ends_inside_a_step_fails_on_every_rank_before_its_last_micro_batch():
    batch = BatchConfig(global_batch_size=8, micro_batch_size=2)  # 70 samples: steps 0..7 whole, step 8 partial
    for name, source in _sources().items():
        for rank in range(4):
            feeds = DataFeeds()
            feeds.micro_batches(source, 7, rank=rank, world_size=4, batch=batch, collate_fn=list)
            it = feeds.micro_batches(source, 8, rank=rank, world_size=4, batch=batch, collate_fn=list)
            with pytest.raises(StreamExhausted, match="step 8") as info:
                list(it)  # rank 0's own samples 64, 65 exist; the global batch does not
            assert info.value.available == 70, name
            assert "total_steps to at most 8" in str(info.value)
            feeds.close()
            with pytest.raises(StreamExhausted):  # a fresh entry (a restart at step 9) fails too
                list(DataFeeds().micro_batches(source, 9, rank=rank, world_size=4, batch=batch, collate_fn=list))


def test_steps_that_go_back_within_an_entry_are_refused():
    source = ShardStream(_shards(), lengths=SHARD_SIZES)
    batch = BatchConfig(global_batch_size=4, micro_batch_size=2)
    feeds = DataFeeds()
    list(feeds.micro_batches(source, 3, rank=0, world_size=2, batch=batch, collate_fn=list))
    for again in (3, 2):
        with pytest.raises(StepOrderError, match=f"step {again} after step 3"):
            feeds.micro_batches(source, again, rank=0, world_size=2, batch=batch, collate_fn=list)
    stale = feeds.micro_batches(source, 5, rank=0, world_size=2, batch=batch, collate_fn=list)
    assert list(feeds.micro_batches(source, 6, rank=0, world_size=2, batch=batch, collate_fn=list)) == [[24, 25]]
    with pytest.raises(StepOrderError):  # step 5's batches taken after step 6's: they shared the iterator
        next(stale)
    # a new entry (after a world change) may start anywhere, including earlier steps
    assert list(DataFeeds().micro_batches(source, 1, rank=0, world_size=2, batch=batch, collate_fn=list)) == [[4, 5]]


def test_unsupported_sources_say_what_to_pass():
    for source, hint in ((iter(STREAM), "one-shot iterator"), ((x for x in STREAM), "one-shot iterator"),
                         (_shards(), "et.ShardStream"), (42, "map-style dataset")):
        with pytest.raises(UnsupportedSource, match=hint):
            as_stream(source)
    with pytest.raises(UnsupportedSource, match="function that returns the shards"):
        ShardStream([range(3)])
    with pytest.raises(ValueError, match="ints >= 0"):
        ShardStream(_shards(), lengths=[3, -1])
    assert as_stream(list(range(3))) is None  # map-style: the seeded permutation path


def test_a_wrong_shard_length_is_caught_when_the_shard_is_read():
    wrong = list(SHARD_SIZES)
    wrong[1] = 4
    with pytest.raises(ShardLengthMismatch, match=r"shard 1 yielded 3 samples but lengths\[1\]=4"):
        list(ShardStream(_shards(), lengths=wrong).open(0))
