"""The checkpoint path's pure parts, without storage: pieces and chunk tables on save, read plans on
restore, the save policy, the saver thread and the scan for a run's data key."""

from __future__ import annotations

import threading

import pytest

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.codec import TensorEntry
from elastictrain.checkpoint.identity import scan_run
from elastictrain.checkpoint.keys import Keyring, LocalKey
from elastictrain.checkpoint.manifest import Body, wrap_context
from elastictrain.checkpoint.policy import SavePolicy
from elastictrain.checkpoint.reader import plan_reads
from elastictrain.checkpoint.saver import BackgroundSaver
from elastictrain.checkpoint.writer import Piece, chunk_table, plan_pieces
from elastictrain.errors import CheckpointCorrupt


def _entries(*sizes: tuple[str, int]) -> list[TensorEntry]:
    out, begin = [], 0
    for name, n in sizes:
        out.append(TensorEntry(name, "U8", (n,), begin, begin + n))
        begin += n
    return out


ENTRIES = _entries(("a", 10), ("empty", 0), ("b", 4))


def test_plan_pieces_cuts_tensors_at_the_chunk_size_and_gives_an_empty_one_none():
    assert plan_pieces(ENTRIES, 4) == [
        Piece(("a", 0), 0, 4), Piece(("a", 1), 4, 4), Piece(("a", 2), 8, 2), Piece(("b", 0), 0, 4),
    ]


def test_chunk_table_lists_each_chunk_once_in_first_use_order_with_its_stored_size():
    pieces = plan_pieces(ENTRIES, 4)
    ids = ["y", "x", "z", "y"]  # b's bytes equal a's first piece: one chunk for both
    for encrypted in (False, True):
        chunks, table = chunk_table(pieces, ids, encrypted=encrypted)
        four, two = crypto.sealed_size(4, encrypted), crypto.sealed_size(2, encrypted)
        assert chunks == (("y", four), ("x", four), ("z", two))
        assert table == ((0, 4), (1, 4), (2, 2), (0, 4))
    assert crypto.sealed_size(4, True) != crypto.sealed_size(4, False)  # both kinds of size were checked


def test_a_read_plan_puts_every_saved_piece_back_where_it_came_from():
    pieces = plan_pieces(ENTRIES, 4)
    _, table = chunk_table(pieces, ["y", "x", "z", "y"], encrypted=False)
    plan = plan_reads("m", ENTRIES, table)
    assert plan.targets == {0: [("a", 0, 4), ("b", 0, 4)], 1: [("a", 4, 4)], 2: [("a", 8, 2)]}
    assert plan.lengths == {0: 4, 1: 4, 2: 2}


@pytest.mark.parametrize("pieces, problem", [
    (((0, 4), (1, 4)), "ends early"),  # a's last 2 bytes and b are not covered
    (((0, 4), (1, 4), (2, 2), (3, 4), (4, 1)), "extra pieces"),
    (((0, 4), (1, 8)), "crosses a tensor boundary"),  # a piece past a's end
    (((0, 4), (0, 4), (0, 2), (1, 4)), "crosses a tensor boundary"),  # chunk 0 listed as 4 and as 2 bytes
])
def test_a_read_plan_refuses_a_table_that_does_not_tile_the_tensors(pieces, problem):
    with pytest.raises(CheckpointCorrupt, match=problem):
        plan_reads("m", ENTRIES, pieces)


def test_save_policy_every_steps_every_seconds_and_never_twice_for_one_step():
    by_steps = SavePolicy(every_steps=10, every_seconds=None, now=0.0)
    assert [s for s in range(1, 31) if by_steps.is_due(s, now=0.0)] == [10, 20, 30]
    by_time = SavePolicy(every_steps=None, every_seconds=100.0, now=50.0)
    assert not by_time.is_due(1, now=149.0) and by_time.is_due(1, now=150.0)
    by_time.started(1, now=150.0)
    assert not by_time.is_due(1, now=1e9)  # never twice for one step
    assert not by_time.is_due(2, now=249.0) and by_time.is_due(2, now=250.0)  # counted from the last save
    assert not SavePolicy(None, None, now=0.0).is_due(10, now=1e9)


def test_background_saver_reports_the_last_started_saves_error_once():
    saver = BackgroundSaver()
    release = threading.Event()

    def failing() -> None:
        assert release.wait(5)
        raise OSError("disk full")

    saver.start(failing, name="et-test-save")
    assert saver.busy
    release.set()
    with pytest.raises(OSError, match="disk full"):
        saver.wait()
    saver.wait()  # reported once
    assert not saver.busy
    saver.start(failing, name="et-test-save")
    saver.join()  # a failure nobody waited for ...
    done: list[int] = []
    saver.start(lambda: done.append(1), name="et-test-save")
    saver.wait()  # ... is not reported by the next save's wait
    assert done == [1]


def _body(run: str, step: int, key_id=None, wrapped=None) -> Body:
    return Body(run, step, 0, 0, 0, (), key_id=key_id, wrapped_key=wrapped)


def test_scan_run_finds_the_runs_data_key_and_names_keys_it_lacks():
    key = LocalKey(bytes(range(32)))
    data_key = b"K" * 32
    wrapped = key.wrap(data_key, wrap_context("r1"))
    listed = [  # newest first
        _body("r1", 9, key_id="local:someone-else", wrapped=wrapped),
        _body("r2", 8, key_id=key.key_id, wrapped=key.wrap(b"\1" * 32, wrap_context("r2"))),
        _body("r1", 7),  # an unencrypted one of the run: passed over
        _body("r1", 6, key_id=key.key_id, wrapped=wrapped),
    ]

    def bodies():  # a lazy listing: the scan stops at the first data key it opens
        yield from listed
        raise AssertionError("read past the data key")

    scan = scan_run(bodies(), None, Keyring(key))
    assert (scan.run, scan.data_key, scan.encrypted, scan.foreign) == ("r1", data_key, True, {"local:someone-else"})
    assert "KKKK" not in repr(scan)
    other = scan_run(iter(listed), "r0", Keyring(key))  # a run run.json names: others' manifests do not count
    assert (other.run, other.data_key, other.encrypted, other.foreign) == ("r0", None, False, frozenset())
    keyless = scan_run(bodies(), None, None)  # without keys it only learns that the run is encrypted
    assert (keyless.run, keyless.data_key, keyless.encrypted) == ("r1", None, True)
