"""CheckpointManager on memory:// and local disk: round trips, incremental, keys, policy, retention."""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from elastictrain.checkpoint import CheckpointManager
from elastictrain.checkpoint.cli import export_checkpoint, list_checkpoints, verify_checkpoints
from elastictrain.checkpoint.manifest import chunk_path, decode_manifest
from elastictrain.checkpoint.storage import FsspecStorage, with_retries
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.errors import CheckpointCorrupt, CheckpointNotFound, StaleTerm, UnsupportedFormat, WrongKey
from elastictrain.statetree import flatten_state, unflatten_state

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
ENV = {"KEY_A": KEY_A, "KEY_B": KEY_B}


def _uri() -> str:
    return f"memory://ckpt-{uuid.uuid4().hex}"


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    with torch.no_grad():
        model.weight.copy_(torch.randn(32, 64, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64, generator=g)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "step": 5, "extras": {"name": "run", "ratio": 0.5}}


def _mgr(uri, enc=True, storage=None, fence=None, **kw):
    cfg = dict(uri=uri, chunk_size_mb=1, encryption=EncryptionConfig(key="env:KEY_A") if enc else None)
    cfg.update(kw)
    return CheckpointManager(CheckpointConfig(**cfg), environ=ENV, storage=storage, fence=fence)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(x.dtype == b[k].dtype and torch.equal(x, b[k]) for k, x in a.items())


@pytest.mark.parametrize("enc", [True, False])
@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_restores_the_same_state(enc, async_save):
    uri = _uri()
    tensors, skeleton = flatten_state(_state())
    with _mgr(uri, enc, async_save=async_save) as mgr:
        assert mgr.latest() is None
        mgr.save(tensors, skeleton, step=10, term=2)
        mgr.wait()
        loaded = mgr.latest()
    assert (loaded.step, loaded.term, loaded.skipped) == (10, 2, [])
    assert _same(loaded.tensors, tensors) and loaded.skeleton == skeleton
    state = unflatten_state(loaded.tensors, loaded.skeleton)
    assert state["extras"] == {"name": "run", "ratio": 0.5} and state["step"] == 5


@pytest.mark.parametrize("enc", [True, False])
def test_restore_into_live_tensors_in_place(enc, tmp_path):
    tensors, skeleton = flatten_state(_state(seed=1))
    with _mgr(f"file://{tmp_path}", enc, async_save=False) as mgr:
        mgr.save(tensors, skeleton, step=3, term=0)
        model = torch.nn.Linear(64, 32)  # a fresh model: parameters require grad
        live = {"model/weight": model.weight, "model/bias": model.bias,
                "rng": torch.zeros(5, dtype=torch.uint8),  # wrong shape: gets a new tensor
                "optimizer/state/0/exp_avg": torch.zeros(64, 32).t()}  # not contiguous: new tensor
        loaded = mgr.latest(into=live)
    assert _same(loaded.tensors, tensors)
    assert torch.equal(model.weight.detach(), tensors["model/weight"])
    assert loaded.tensors["model/weight"].data_ptr() == model.weight.data_ptr()
    assert loaded.tensors["rng"].data_ptr() != live["rng"].data_ptr() and live["rng"].eq(0).all()
    assert live["optimizer/state/0/exp_avg"].eq(0).all()


def test_restore_into_never_writes_one_memory_twice(tmp_path):
    with _mgr(f"file://{tmp_path}", async_save=False) as mgr:
        mgr.save({"a": torch.ones(100), "b": torch.full((100,), 2.0)}, None, step=1, term=0)
        shared = torch.zeros(100)
        loaded = mgr.latest(into={"a": shared, "b": shared})  # tied names: one memory
    assert torch.equal(loaded.tensors["a"], torch.ones(100)) and torch.equal(loaded.tensors["b"], torch.full((100,), 2.0))
    assert torch.equal(shared, torch.ones(100))  # only the first name restored into it


@pytest.mark.parametrize("where", ["memory", "file"])
def test_storage_reads_empty_objects_and_deletes_around_absent_names(where, tmp_path):
    storage = FsspecStorage(_uri() if where == "memory" else f"file://{tmp_path}/run")
    for name, data in (("chunks/a", b"abc"), ("chunks/b", b"def"), ("chunks/c", b"ghi"), ("chunks/empty", b"")):
        storage.put(name, [data])
    assert storage.get("chunks/a") == b"abc" and storage.get("chunks/empty") == b""
    with pytest.raises(FileNotFoundError):
        storage.get("chunks/absent")
    storage.discard(n for n in ("chunks/a", "chunks/absent", "chunks/b"))  # absent names are skipped, not fatal
    storage.delete(n for n in ("chunks/absent", "chunks/c"))
    assert storage.list("chunks") == {"chunks/empty": 0}


def test_s3_reads_that_fail_are_retried_as_one_request_each():
    # the one-request read of an object store falls back to a second kind of read only for an empty
    # object; any other failure goes to the retries, with their backoff, as it is
    class Failing:
        protocol = ("s3", "s3a")

        def __init__(self):
            self.calls = []

        def cat_file(self, path, start=None, end=None):
            self.calls.append(start)
            raise ConnectionResetError("connection reset by peer")

    storage = FsspecStorage(_uri(), attempts=3)
    storage.fs, storage._s3 = Failing(), True
    with pytest.raises(ConnectionResetError):
        storage.get("manifests/x")
    assert storage.fs.calls == [0, 0, 0]


def test_a_local_listing_that_fails_is_an_error_not_an_empty_store(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/run"
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(10)}, None, step=7, term=0)
    real_scandir = os.scandir
    vanished = str(tmp_path / "run" / "chunks")

    def scandir(path="."):
        if str(path).endswith("manifests"):  # EIO, ESTALE on NFS, EMFILE: the folder is there, unread
            raise OSError(errno.EIO, "Input/output error", str(path))
        if str(path).startswith(vanished + os.sep):  # a chunk folder another writer's retention just emptied
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    storage = FsspecStorage(uri, attempts=2)
    with pytest.raises(OSError, match="Input/output error"):
        storage.list("manifests")  # not {}: "no checkpoints" would start the run from scratch
    assert storage.list("chunks") == {}
    with _mgr(uri, async_save=False) as mgr:
        with pytest.raises(OSError, match="Input/output error"):
            mgr.latest()


def test_retention_under_a_root_with_glob_characters_deletes_only_its_own_chunks():
    sweep = f"memory://sweep-{uuid.uuid4().hex}"
    init = {"w": torch.arange(1000.0)}  # both runs start from the same weights: the same chunk id
    with _mgr(f"{sweep}/lr1", enc=False, async_save=False, keep_last=1) as a:
        a.save(init, None, step=1, term=0)
    with _mgr(f"{sweep}/lr[12]", enc=False, async_save=False, keep_last=1) as b:
        b.save(init, None, step=1, term=0)
        b.save({"w": init["w"] + 1}, None, step=2, term=0)  # retires step 1 and its chunk, under lr[12]/
        assert len(b.storage.list("chunks")) == 1
    with _mgr(f"{sweep}/lr1", enc=False, async_save=False) as a:
        assert torch.equal(a.latest().tensors["w"], init["w"])


def test_local_storage_view_maps_files(tmp_path):
    storage = FsspecStorage(f"file://{tmp_path}")
    storage.put("chunks/x", [b"abc", b"def"])
    storage.put("chunks/empty", [b""])
    with storage.view("chunks/x") as data:
        assert bytes(data) == b"abcdef"
    with storage.view("chunks/empty") as data:
        assert len(data) == 0
    with pytest.raises(FileNotFoundError):
        with storage.view("chunks/absent"):
            pass
    with pytest.raises(ValueError):
        with storage.view("../escape"):
            pass


def test_failed_restore_of_local_chunks_leaves_no_map_open(tmp_path):
    import gc

    root = tmp_path / "run"
    with _mgr(f"file://{root}", async_save=False) as mgr:
        mgr.save({"w": torch.randn(3 << 18)}, None, step=1, term=0)  # 3 chunks of 1 MiB
    for chunk in (p for p in (root / "chunks").rglob("*") if p.is_file()):
        data = bytearray(chunk.read_bytes())
        data[100] ^= 1
        chunk.write_bytes(bytes(data))

    def mapped() -> int:
        with open("/proc/self/maps") as maps:
            return sum(str(root / "chunks") in line for line in maps)

    gc.disable()  # what only the cycle collector would free counts as open
    try:
        with _mgr(f"file://{root}") as mgr:
            for _ in range(3):
                with pytest.raises(CheckpointCorrupt, match="authentication failed"):
                    mgr.latest()
            assert mapped() == 0
    finally:
        gc.enable()


class _SlowCommits(FsspecStorage):
    def put(self, name, parts):
        if name.startswith("manifests/"):
            time.sleep(0.2)  # the commit lands while the restore would be reading
        return super().put(name, parts)


def test_restore_waits_for_the_managers_own_save_in_flight():
    uri = _uri()
    with _mgr(uri, keep_last=1, storage=_SlowCommits(uri)) as mgr:
        mgr.save({"w": torch.zeros(1000)}, None, step=1, term=0)
        mgr.wait()
        mgr.save({"w": torch.ones(1000)}, None, step=2, term=0)  # commits step 2, then retires step 1
        loaded = mgr.latest()
        assert loaded.step == 2 and torch.equal(loaded.tensors["w"], torch.ones(1000))
        mgr.save({"w": torch.full((1000,), 3.0)}, None, step=3, term=0)
        assert torch.equal(mgr.load(3).tensors["w"], torch.full((1000,), 3.0))


def test_restore_lists_again_when_another_writer_retires_what_it_read():
    uri = _uri()
    with _mgr(uri, async_save=False) as first:
        first.save({"w": torch.zeros(1000)}, None, step=1, term=0)

    class Raced(FsspecStorage):
        raced = False

        def get(self, name, size=None):
            if name.startswith("chunks/") and not Raced.raced:
                Raced.raced = True  # meanwhile, the run's new leader commits step 2 and retires step 1
                with _mgr(uri, async_save=False, keep_last=1) as other:
                    other.save({"w": torch.ones(1000)}, None, step=2, term=1)
            return super().get(name, size)

    with _mgr(uri, storage=Raced(uri)) as reader:
        loaded = reader.latest()
    assert Raced.raced and loaded.step == 2 and torch.equal(loaded.tensors["w"], torch.ones(1000))
    # what the first pass skipped is still reported (ckpt export prints it)
    assert [name for name, _ in loaded.skipped] == ["manifests/000000000001-00000000.json"]


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_orders_chunks_before_the_manifest(fsync, tmp_path, monkeypatch):
    import os

    from elastictrain.checkpoint.storage import TMP_MARK

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}").split(TMP_MARK)[0])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    root = tmp_path / "run"
    with _mgr(f"file://{root}", async_save=False, fsync=fsync) as mgr:
        mgr.save({"a": torch.ones(1000), "b": torch.zeros(10)}, None, step=1, term=0)
    if not fsync:
        assert synced == []
        return
    chunks = sorted(str(p) for p in (root / "chunks").rglob("*") if p.is_file())
    manifest = str(root / "manifests" / "000000000001-00000000.json")
    assert len(chunks) == 2 and all(c in synced for c in chunks) and manifest in synced
    at = synced.index(manifest)
    for c in chunks:  # each chunk and the folders it was renamed into are durable before the commit
        assert synced.index(c) < at and synced.index(os.path.dirname(c)) < at
    assert synced.index(str(root / "chunks")) < at and str(root.parent) in synced[:at]
    assert str(root / "manifests") in synced[at + 1 :]  # then the commit itself


def test_async_save_snapshots_before_returning():
    uri = _uri()
    t = {"w": torch.zeros(1000)}
    with _mgr(uri) as mgr:
        mgr.save(t, {"__tensor__": "w"}, step=1, term=0)
        t["w"].fill_(7.0)  # training goes on while the save runs
        mgr.wait()
        assert torch.equal(mgr.latest().tensors["w"], torch.zeros(1000))


class _Unreadable(torch.Tensor):
    """A tensor that fails when the snapshot reads it (as a CUDA error or an interrupt would)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            raise RuntimeError("device lost")
        return super().__torch_function__(func, types, args, kwargs)


def test_snapshot_that_fails_part_way_is_never_reused():
    uri = _uri()
    with _mgr(uri) as mgr:
        mgr.save({"a": torch.zeros(1000), "b": torch.ones(1000)}, None, step=1, term=0)
        mgr.wait()
        a = torch.full((1000,), 7.0)
        with pytest.raises(RuntimeError, match="device lost"):  # 'a' is copied aside, then 'b' fails
            mgr.save({"a": a, "b": torch.ones(1000).as_subclass(_Unreadable)}, None, step=2, term=0)
        mgr.save({"a": a, "b": torch.ones(1000)}, None, step=3, term=0)
        mgr.wait()
        assert _same(mgr.latest().tensors, {"a": a, "b": torch.ones(1000)})
    with pytest.raises(ValueError, match="dense tensor"):
        _mgr(_uri()).save({"s": torch.zeros(4).to_sparse()}, None, step=1, term=0)


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("bad", [
    {"z": torch.zeros(3, dtype=torch.complex64)}, {"n": 3.0}, {"": torch.ones(2)}, {"a\x00b": torch.ones(2)},
    {"s": torch.zeros(4).to_sparse()}, {"m": torch.empty(4, device="meta")},
], ids=["complex", "not-a-tensor", "empty-name", "nul-in-name", "sparse", "meta"])
def test_bad_state_is_refused_before_anything_is_written(async_save, bad):
    uri = _uri()
    with _mgr(uri, async_save=async_save, every_steps=10) as mgr:
        with pytest.raises(ValueError, match="state entry|tensor name"):
            mgr.save({"ok": torch.ones(2), **bad}, None, step=10, term=0)  # "ok" first: nothing half-done
        assert mgr.should_save(10)  # the step still counts as due
        storage = FsspecStorage(uri)
        assert storage.fs.find(storage.root) == []  # not even run.json
        mgr.save({"ok": torch.ones(2)}, None, step=10, term=0)
        mgr.wait()
        assert torch.equal(mgr.latest().tensors["ok"], torch.ones(2))


def test_a_skeleton_nested_too_deep_is_skipped_as_damage(tmp_path):
    import dataclasses
    import json
    import struct

    from elastictrain.checkpoint.manifest import Table, encode_manifest

    uri = f"file://{tmp_path}/run"
    with _mgr(uri, enc=False, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save({"w": torch.full((3,), float(step))}, {"__tensor__": "w"}, step=step, term=0)
    storage, name = FsspecStorage(uri), "manifests/000000000002-00000000.json"
    body = decode_manifest(storage.get(name)).body
    doc = json.loads(body.table.header[8:])
    doc["__metadata__"]["elastictrain.skeleton"] = "[" * 100_000 + "]" * 100_000
    text = json.dumps(doc).encode()
    text += b" " * (-(len(text) + 8) % 8)
    header = struct.pack("<Q", len(text)) + text
    data_len = body.content_bytes - len(body.table.header)
    forged = dataclasses.replace(body, table=Table(header, body.table.pieces), content_bytes=len(header) + data_len)
    storage.put(name, [encode_manifest(forged, None)])  # a valid digest: only the skeleton is wrong
    with _mgr(uri, enc=False) as mgr:
        loaded = mgr.latest()
        assert loaded.step == 1 and torch.equal(loaded.tensors["w"], torch.ones(3))
        assert any(e["kind"] == "checkpoint_skipped" and "skeleton" in e["reason"] for e in mgr.events)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_table_too_large_to_read_back_is_refused_before_anything_is_written(async_save, monkeypatch):
    from elastictrain.checkpoint import codec

    monkeypatch.setattr(codec, "MAX_WRITTEN_HEADER_BYTES", 4096)  # stands for safetensors' 100,000,000 bytes
    uri = _uri()
    with _mgr(uri, async_save=async_save, keep_last=1) as mgr:
        mgr.save({"w": torch.ones(2)}, {"__tensor__": "w"}, step=1, term=0)
        mgr.wait()
        positions = list(range(2000))  # a sampler's indices kept in the state as a plain list
        with pytest.raises(ValueError, match="tensor table would take .* over the 4096 that safetensors reads"):
            mgr.save({"w": torch.full((2,), 2.0)}, {"w": {"__tensor__": "w"}, "pos": positions}, step=2, term=0)
        assert [i.step for i in mgr.list()] == [1]  # and keep_last=1 retired nothing
        assert torch.equal(mgr.latest().tensors["w"], torch.ones(2))


@pytest.mark.parametrize("async_save", [False, True])
def test_negative_views_are_saved_as_the_values_they_show(async_save):
    uri = _uri()
    state = {"w": torch._neg_view(torch.arange(4.0)), "v": torch.ones(3)}
    with _mgr(uri, async_save=async_save) as mgr:
        mgr.save(state, None, step=1, term=0)
        mgr.wait()
        assert torch.equal(mgr.latest().tensors["w"], -torch.arange(4.0))
        into = {"w": torch._neg_view(torch.zeros(4)), "v": torch.zeros(3)}
        loaded = mgr.latest(into=into)  # a negative view cannot take bytes in place: a new tensor instead
        assert torch.equal(loaded.tensors["w"], -torch.arange(4.0)) and torch.equal(into["v"], torch.ones(3))


def test_a_damaged_run_file_says_how_to_go_on():
    from elastictrain.checkpoint.manifest import RUN_FILE

    uri = _uri()
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
    storage = FsspecStorage(uri)
    storage.put(RUN_FILE, [storage.get(RUN_FILE)[:-2]])
    with _mgr(uri, async_save=False) as mgr:
        with pytest.raises(CheckpointCorrupt, match=r"run.json is not valid JSON .*untouched: delete run.json"):
            mgr.latest()
    storage.delete([RUN_FILE])
    with _mgr(uri, async_save=False) as mgr:
        assert torch.equal(mgr.latest().tensors["w"], torch.ones(3))
        mgr.save({"w": torch.zeros(3)}, None, step=2, term=1)
    with _mgr(uri) as mgr:  # run.json is back, naming the same run: both checkpoints are its own
        assert [i.step for i in mgr.list()] == [1, 2] and mgr.load(1).step == 1


def test_a_step_too_large_for_a_manifest_name_is_refused_up_front():
    uri = _uri()
    with _mgr(uri, async_save=False) as mgr:
        with pytest.raises(ValueError, match="between 0 and"):
            mgr.save({"w": torch.ones(2)}, None, step=10**20, term=0)
        assert FsspecStorage(uri).fs.find(FsspecStorage(uri).root) == []


def test_incremental_save_writes_only_changed_chunks_and_survives_resubmission():
    uri = _uri()
    t = {f"layer{i}": torch.randn(128 * 1024) for i in range(10)}  # 10 x 512 KiB
    with _mgr(uri) as mgr:
        mgr.save(t, None, step=1, term=0)
        mgr.wait()
        full = mgr.reports[-1]
        t["layer3"].add_(1.0)
        mgr.save(t, None, step=2, term=0)
        mgr.wait()
        inc = mgr.reports[-1]
    assert full.chunks_written == 10 and inc.chunks_written == 1 and inc.chunks_reused == 9
    assert inc.bytes_written < 0.15 * full.bytes_written
    with _mgr(uri) as again:  # a resubmitted job: same data key, so unchanged chunks dedupe
        assert _same(again.latest().tensors, t)
        t["layer4"].add_(1.0)
        again.save(t, None, step=3, term=1)
        again.wait()
        assert again.reports[-1].chunks_written == 1


def test_sync_incremental_dedupes_by_content():
    uri = _uri()
    t = {"a": torch.randn(1000), "b": torch.randn(1000), "a_copy": None}
    t["a_copy"] = t["a"].clone()
    with _mgr(uri, async_save=False) as mgr:
        mgr.save(t, None, step=1, term=0)
        assert mgr.reports[-1].chunks_written == 2  # a and a_copy share one chunk
        mgr.save(t, None, step=2, term=0)
        assert mgr.reports[-1].chunks_written == 0
        assert _same(mgr.load(1).tensors, t)


def test_key_rotation_reads_old_checkpoints_and_wrong_key_is_refused():
    uri = _uri()
    t = {"w": torch.randn(100)}
    with _mgr(uri) as mgr:
        mgr.save(t, None, step=1, term=0)
    rotated = CheckpointConfig(uri=uri, encryption=EncryptionConfig(key="env:KEY_B", old_keys=["env:KEY_A"]))
    with CheckpointManager(rotated, environ=ENV) as mgr:
        assert _same(mgr.latest().tensors, t)
        mgr.save(t, None, step=2, term=0)
        mgr.wait()
        assert mgr.reports[-1].chunks_written == 0  # the data key survived the rotation
        assert {i.key_id for i in mgr.list()} == {"local:" + k for k in _fingerprints("KEY_A", "KEY_B")}
    wrong = CheckpointConfig(uri=uri, encryption=EncryptionConfig(key="env:KEY_B"))
    with CheckpointManager(wrong, environ=ENV) as mgr:
        assert mgr.latest().step == 2
        with pytest.raises(WrongKey, match="old_keys"):
            mgr.load(1)
    with _mgr(uri, enc=False) as mgr:
        with pytest.raises(WrongKey, match="encrypted"):
            mgr.latest()


def test_a_key_that_opens_none_of_the_runs_checkpoints_writes_nothing():
    uri = _uri()
    with _mgr(uri, async_save=False, keep_last=2) as mgr:
        for step in (1, 2):
            mgr.save({"w": torch.full((100,), float(step))}, None, step=step, term=0)
    wrong = CheckpointConfig(uri=uri, keep_last=2, async_save=False, encryption=EncryptionConfig(key="env:KEY_B"))
    with CheckpointManager(wrong, environ=ENV) as mgr:  # a mistyped key, or a rotation without old_keys
        for step in (3, 4):
            with pytest.raises(WrongKey, match="none of the configured keys: refusing to write beside them.*old_keys"):
                mgr.save({"w": torch.full((100,), float(step))}, None, step=step, term=0)
    with _mgr(uri) as mgr:  # the run's checkpoints are all still there, and nothing else
        assert [i.step for i in mgr.list()] == [1, 2]
        assert torch.equal(mgr.latest().tensors["w"], torch.full((100,), 2.0))


def test_a_damaged_wrapped_key_does_not_stop_the_run_key_from_saving():
    import json

    from elastictrain.checkpoint.manifest import canonical

    uri = _uri()
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(4)}, None, step=100, term=0)
        name = "manifests/000000000100-00000000.json"
        doc = json.loads(mgr.storage.get(name))
    wrapped = bytearray(base64.b64decode(doc["body"]["encryption"]["wrapped_key"]))
    wrapped[-1] ^= 1  # the run's only checkpoint can no longer be opened by anyone
    doc["body"]["encryption"]["wrapped_key"] = base64.b64encode(bytes(wrapped)).decode()
    FsspecStorage(uri).put(name, [canonical(doc)])
    with _mgr(uri, async_save=False) as mgr:  # the run's own key: it is damage, not another key's run
        mgr.save({"w": torch.zeros(4)}, None, step=101, term=1)
        assert torch.equal(mgr.latest().tensors["w"], torch.zeros(4))


def test_newer_checkpoints_under_a_key_this_manager_lacks_do_not_count_as_kept():
    uri = _uri()
    with _mgr(uri, async_save=False, keep_last=2) as mgr:
        mgr.save({"w": torch.full((4,), 100.0)}, None, step=100, term=0)
    rotated = CheckpointConfig(uri=uri, async_save=False, keep_last=2, chunk_size_mb=1,
                               encryption=EncryptionConfig(key="env:KEY_B", old_keys=["env:KEY_A"]))
    with CheckpointManager(rotated, environ=ENV) as mgr:  # a rotation: step 200 under the new key only
        mgr.save({"w": torch.full((4,), 200.0)}, None, step=200, term=1)
    config = CheckpointConfig(uri=uri, async_save=False, keep_last=1, chunk_size_mb=1,
                              encryption=EncryptionConfig(key="env:KEY_A"))
    with CheckpointManager(config, environ=ENV) as stale:  # a worker still configured with the old key
        loaded = stale.latest()
        assert loaded.step == 100 and "WrongKey" in loaded.skipped[0][1]
        stale.save({"w": torch.full((4,), 150.0)}, None, step=150, term=2)
        assert [i.step for i in stale.list()] == [150, 200]  # not retired in favour of what it cannot read
        assert stale.latest().step == 150


def _fingerprints(*names):
    from elastictrain.checkpoint.crypto import key_fingerprint

    return {key_fingerprint(base64.b64decode(ENV[n])) for n in names}


def test_an_opened_manifest_never_shows_the_data_key():
    from elastictrain.checkpoint.reader import open_manifest

    uri = _uri()
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(4)}, None, step=1, term=0)
        opened = open_manifest(mgr.storage, "manifests/000000000001-00000000.json", mgr.keyring, None)
    assert len(opened.data_key) == 32
    for text in (repr(opened), str(opened)):
        assert repr(opened.data_key) not in text and opened.data_key.hex() not in text


def test_a_key_given_for_an_unencrypted_store_is_named_as_the_problem(monkeypatch):
    uri = _uri()
    with _mgr(uri, enc=False, async_save=False) as mgr:
        mgr.save({"w": torch.ones(4)}, None, step=1, term=0)
    monkeypatch.setenv("KEY_A", KEY_A)
    (name, problem), = verify_checkpoints(uri, ["env:KEY_A"])
    assert "unencrypted, but a key was given" in problem


def test_nothing_in_plaintext_at_rest(tmp_path):
    marker = torch.tensor([float(i) + 0.123456 for i in range(64)])
    names = {"secret_layer_name/weight": marker, "other_tensor_bias": torch.full((7, 13), 3.25)}
    uri = f"file://{tmp_path}/run"
    with _mgr(uri) as mgr:
        mgr.save(names, {"__tensor__": "secret_layer_name/weight", "note": "skeleton_text_x"}, step=1, term=0)
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert len(stored) > marker.numel() * 4
    needles = [bytes(marker.numpy().data)[i : i + 16] for i in range(0, 256, 16)]
    needles += [b"secret_layer_name", b"other_tensor_bias", b"skeleton_text_x", b"[7,13]", b"F32"]
    needles += [KEY_A.encode(), base64.b64decode(KEY_A)]
    assert [n for n in needles if n in stored] == []
    with _mgr(f"file://{tmp_path}/plain", enc=False) as plain_mgr:  # the same test finds them when unencrypted
        plain_mgr.save(names, None, step=2, term=0)
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert needles[0] in stored


def test_should_save_policy():
    clock = itertools.count(0.0, 1.0)
    mgr = CheckpointManager(CheckpointConfig(uri=_uri(), every_steps=10, every_seconds=100.0),
                            clock=lambda: next(clock))
    assert [s for s in range(1, 31) if mgr.should_save(s, now=1.0)] == [10, 20, 30]
    assert mgr.should_save(3, now=150.0) and not mgr.should_save(3, now=50.0)
    mgr.save({"w": torch.zeros(1)}, None, step=10, term=0)
    assert not mgr.should_save(10, now=1e9)  # never twice for one step
    mgr.close()


def test_events_are_of_the_runs_vocabulary_and_keep_their_old_names_under_the_event_key():
    heard: list[dict] = []
    mgr = CheckpointManager(CheckpointConfig(uri=_uri(), async_save=False), fence=lambda term: term >= 1,
                            listener=heard.append)
    with pytest.raises(StaleTerm):
        mgr.save({"w": torch.zeros(4)}, None, step=1, term=0)
    mgr.save({"w": torch.zeros(4)}, None, step=1, term=1)
    mgr.close()
    assert [e["kind"] for e in mgr.events] == ["checkpoint_failed", "checkpoint"]
    assert [e["event"] for e in mgr.events] == ["save_failed", "saved"]  # the deprecated key keeps the old names
    assert heard == mgr.events and mgr.events[1]["step"] == 1


def test_fence_refusal_commits_nothing():
    uri = _uri()
    mgr = CheckpointManager(CheckpointConfig(uri=uri, async_save=True), fence=lambda term: term >= 3)
    mgr.save({"w": torch.zeros(4)}, None, step=1, term=2)
    with pytest.raises(StaleTerm):
        mgr.wait()
    assert mgr.latest() is None and mgr.events[-1]["kind"] == "checkpoint_failed"
    mgr.save({"w": torch.zeros(4)}, None, step=1, term=3)
    mgr.wait()
    assert mgr.latest().term == 3
    mgr.close()


def test_retention_keeps_last_and_removes_unshared_chunks():
    uri = _uri()
    storage = FsspecStorage(uri)
    with _mgr(uri, keep_last=2, async_save=False) as mgr:
        t = {"fixed": torch.ones(100), "moving": torch.zeros(100)}
        for step in range(1, 6):
            t["moving"].fill_(step)
            mgr.save(t, None, step=step, term=0)
        assert [i.step for i in mgr.list()] == [4, 5]
        assert len(storage.list("chunks")) == 3  # fixed + moving@4 + moving@5
        assert _same(mgr.load(4).tensors, {"fixed": torch.ones(100), "moving": torch.full((100,), 4.0)})
        with pytest.raises(CheckpointNotFound):
            mgr.load(2)


def test_retention_discards_no_chunk_while_a_retired_manifest_stays():
    # chunks go in best-effort batches, so a manifest must be gone first, checked: one that cannot be
    # deleted keeps every chunk, and the checkpoint it commits stays loadable
    class NoManifestDeletes(FsspecStorage):
        discarded: list[str] = []

        def delete(self, names):
            if list(names):
                raise PermissionError("AccessDenied")

        def discard(self, names):
            names = list(names)
            self.discarded.extend(names)
            super().discard(names)

    uri = _uri()
    storage = NoManifestDeletes(uri)
    with _mgr(uri, storage=storage, keep_last=1, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save({"w": torch.full((100,), float(step))}, None, step=step, term=0)
        assert any(e["kind"] == "retention_failed" and "AccessDenied" in e["reason"] for e in mgr.events)
        assert storage.discarded == []
        assert torch.equal(mgr.load(1).tensors["w"], torch.full((100,), 1.0))


@pytest.mark.parametrize("when", ["after_commit", "between_manifests_and_chunks"])
def test_a_superseded_leaders_retention_spares_what_the_new_leader_reuses(when):
    # The old leader (term 1) commits step 2 while term 1 is current; then a new leader (term 2) saves
    # step 3, whose 'scale' equals step 1's (a GradScaler back at 65536), so it reuses that chunk. The old
    # leader's retention, planned without step 3, would delete it with step 1.
    uri = _uri()
    newest = [1]
    fence = lambda term: term >= newest[0]  # noqa: E731 - what election.is_current answers

    def new_leader_saves():
        newest[0] = 2
        with _mgr(uri, keep_last=1, async_save=False, fence=fence) as new:
            new.save({"scale": torch.tensor([65536.0]), "w": torch.full((1000,), 3.0)}, None, step=3, term=2)
            assert new.reports[-1].chunks_reused == 1

    class OldLeadersStorage(FsspecStorage):
        def put(self, name, parts):
            super().put(name, parts)
            if when == "after_commit" and name.startswith("manifests/000000000002"):
                new_leader_saves()

        def delete(self, names):
            names = list(names)
            if when == "between_manifests_and_chunks" and names and newest[0] == 1:
                new_leader_saves()
            super().delete(names)

    with _mgr(uri, keep_last=1, async_save=False, fence=fence, storage=OldLeadersStorage(uri)) as old:
        old.save({"scale": torch.tensor([65536.0]), "w": torch.full((1000,), 1.0)}, None, step=1, term=1)
        old.save({"scale": torch.tensor([32768.0]), "w": torch.full((1000,), 2.0)}, None, step=2, term=1)
        assert any(e["kind"] == "retention_skipped" for e in old.events)
    with _mgr(uri) as reader:
        loaded = reader.latest()
        assert (loaded.step, loaded.term) == (3, 2) and not loaded.skipped
        assert loaded.tensors["scale"].item() == 65536.0


def test_retention_reads_every_manifest_again_at_each_save():
    # what a manifest name held at the last save says nothing of what it holds now: rewritten by
    # another writer's save of the same step and term (same size: same shapes), its chunks must not
    # be taken for unreferenced; damaged in place, it must not count as one of the kept checkpoints
    uri = _uri()
    storage = FsspecStorage(uri)
    with _mgr(uri, keep_last=2, async_save=False) as mgr, _mgr(uri, keep_last=2, async_save=False) as other:
        mgr.save({"w": torch.zeros(100)}, None, step=1, term=0)
        mgr.save({"w": torch.ones(100)}, None, step=2, term=0)
        name = mgr.list()[-1].name
        before = len(storage.get(name))
        other.save({"w": torch.full((100,), 2.0)}, None, step=2, term=0)
        assert len(storage.get(name)) == before
        mgr.save({"w": torch.full((100,), 3.0)}, None, step=3, term=0)  # retires step 1
        assert [i.step for i in mgr.list()] == [2, 3]
        assert torch.equal(mgr.load(2).tensors["w"], torch.full((100,), 2.0))
        storage.put(name, [bytes(before)])  # step 2's manifest damaged in place, same size
        mgr.save({"w": torch.full((100,), 4.0)}, None, step=4, term=0)
        assert [i.step for i in mgr.list() if i.error is None] == [3, 4]  # two that decode are kept
        storage.put(mgr.list()[-1].name, [b"\0" * 10])  # and the newest damaged: step 3 is restored
        assert mgr.latest().step == 3


def test_retention_spares_foreign_files_and_sweeps_dead_writers_temporaries(tmp_path):
    import os

    from elastictrain.checkpoint.manager import STALE_TEMP_S
    from elastictrain.checkpoint.storage import TMP_MARK

    root = tmp_path / "run"
    (root / "chunks" / "ab").mkdir(parents=True)
    stray = root / "chunks" / "ab" / "notes copy.txt"  # not a name storage would make: left alone
    stray.write_text("kept")
    dead = root / "chunks" / "ab" / f"{'ab' * 32}{TMP_MARK}0123456789ab"  # a put killed before its rename
    young = root / "manifests" / f"000000000009-00000000.json{TMP_MARK}0123456789ab"  # a put in progress
    young.parent.mkdir()
    for path in (dead, young):
        path.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(dead, (old, old))
    with _mgr(f"file://{root}", keep_last=1) as mgr:
        for step in (1, 2, 3):
            mgr.save({"w": torch.full((1000,), float(step))}, None, step=step, term=0)
            mgr.wait()  # raises if retention broke the save
        assert [i.step for i in mgr.list()] == [3]
        assert not any(e["kind"] == "retention_failed" for e in mgr.events)
        assert any(e.get("temporaries_deleted") == 1 for e in mgr.events)
    chunks = [p for p in (root / "chunks").rglob("*") if p.is_file() and p != stray]
    assert len(chunks) == 1 and stray.read_text() == "kept" and young.exists() and not dead.exists()


def test_flush_keeps_a_folder_whose_fsync_failed_pending(tmp_path, monkeypatch):
    import os

    storage = FsspecStorage(f"file://{tmp_path}/run", fsync=True)
    for name in ("chunks/aa/x", "chunks/bb/y"):
        storage.put(name, [b"data"])
    real_fsync, synced = os.fsync, []

    def failing_once(fd):
        if not synced:
            synced.append(None)
            raise OSError(5, "EIO")
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)
    with pytest.raises(OSError):
        storage.flush()
    storage.flush()
    for folder in ("chunks/aa", "chunks/bb", "chunks", ""):
        assert str(tmp_path / "run" / folder).rstrip("/") in synced


def test_wait_reports_the_last_save_and_earlier_failures_stay_in_events():
    uri = _uri()

    class FailsOnce(FsspecStorage):
        failed = False

        def put(self, name, parts):
            if name.startswith("chunks/") and not FailsOnce.failed:
                FailsOnce.failed = True
                raise PermissionError("bucket policy")
            return super().put(name, parts)

    with _mgr(uri, storage=FailsOnce(uri)) as mgr:
        mgr.save({"w": torch.zeros(1000)}, None, step=1, term=0)
        mgr.save({"w": torch.ones(1000)}, None, step=2, term=0)
        mgr.wait()
        assert [e["step"] for e in mgr.events if e["kind"] == "checkpoint_failed"] == [1]
        assert mgr.latest().step == 2


def test_damaged_newest_falls_back_with_an_event(monkeypatch):
    uri = _uri()
    storage = FsspecStorage(uri)
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(10)}, None, step=1, term=0)
        mgr.save({"w": torch.full((10,), 2.0)}, None, step=2, term=0)
    name = "manifests/000000000002-00000000.json"
    raw = bytearray(storage.get(name))
    raw[len(raw) // 2] ^= 0x04
    storage.put(name, [bytes(raw)])
    with _mgr(uri) as mgr:
        loaded = mgr.latest()
        assert loaded.step == 1 and loaded.skipped[0][0] == name
        assert any(e["kind"] == "checkpoint_skipped" for e in mgr.events)
    monkeypatch.setenv("KEY_A", KEY_A)
    report = dict(verify_checkpoints(uri, ["env:KEY_A"]))
    assert report["manifests/000000000001-00000000.json"] is None
    assert "CheckpointCorrupt" in report[name]


@pytest.mark.parametrize("enc", [True, False])
def test_a_newest_checkpoint_of_a_newer_format_is_refused_not_rolled_back_past(enc, monkeypatch):
    from elastictrain.checkpoint import manifest

    uri = _uri()
    storage = FsspecStorage(uri)
    name = "manifests/000000000002-00000000.json"
    with _mgr(uri, enc, async_save=False) as mgr:
        mgr.save({"w": torch.ones(10)}, None, step=1, term=0)
        with monkeypatch.context() as m:  # as a newer release, on another machine of the fleet, writes it
            m.setattr(manifest, "VERSION", 2)
            m.setattr(manifest, "_SIGNED_PREFIX", b"elastictrain/v2/manifest\x00")
            mgr.save({"w": torch.full((10,), 2.0)}, None, step=2, term=0)
    newer = storage.get(name)
    assert json.loads(newer)["version"] == 2
    with _mgr(uri, enc) as mgr:
        with pytest.raises(UnsupportedFormat, match="roll the run back") as err:
            mgr.latest()
        assert name in str(err.value) and "version 2" in str(err.value)
        assert not [e for e in mgr.events if e["kind"] == "checkpoint_skipped"]
        assert mgr.load(1).step == 1  # asked for by step, the older one is still there
    assert storage.get(name) == newer
    storage.delete([name])  # what the error says to do, to resume from the one before
    with _mgr(uri, enc) as mgr:
        assert mgr.latest().step == 1


@pytest.mark.parametrize("enc", [True, False])
@pytest.mark.parametrize("field,damaged", [("version", 3), ("version", 0), ("format", "elastictrain-checkpoinu")])
def test_a_damaged_version_or_format_field_is_damage_not_a_newer_release(enc, field, damaged):
    uri = _uri()
    storage = FsspecStorage(uri)
    with _mgr(uri, enc, async_save=False) as mgr:
        mgr.save({"w": torch.ones(10)}, None, step=1, term=0)
        mgr.save({"w": torch.full((10,), 2.0)}, None, step=2, term=0)
    name = "manifests/000000000002-00000000.json"
    doc = json.loads(storage.get(name))
    doc[field] = damaged  # one bit flipped in a field the signature does not cover
    storage.put(name, [json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()])
    with _mgr(uri, enc) as mgr:
        loaded = mgr.latest()
        assert loaded.step == 1 and loaded.skipped[0][0] == name
        assert "field is damaged" in loaded.skipped[0][1]


def test_a_checkpoint_saved_after_falling_back_is_kept_over_the_damaged_newer_one(tmp_path):
    uri = f"file://{tmp_path}/run"
    with _mgr(uri, keep_last=1, async_save=False) as mgr:
        mgr.save({"w": torch.full((100,), 10.0)}, None, step=10, term=0)
        mgr.save({"w": torch.full((100,), 20.0)}, None, step=20, term=0)
    for chunk in (tmp_path / "run" / "chunks").rglob("*"):
        if chunk.is_file():  # with keep_last=1 only step 20's chunk is left: damage it
            raw = bytearray(chunk.read_bytes())
            raw[-1] ^= 1
            chunk.write_bytes(bytes(raw))
    with _mgr(uri, keep_last=1, async_save=False) as mgr:
        with pytest.raises(CheckpointCorrupt):
            mgr.latest()  # nothing verifies: the run restarts from scratch, or from what the caller has
        # training goes on and saves at step 15 (every_seconds, or a preemption notice) in a new term
        mgr.save({"w": torch.full((100,), 15.0)}, None, step=15, term=1)
        assert [i.step for i in mgr.list()] == [15, 20]  # the damaged step 20 is not what is kept
        assert torch.equal(mgr.latest().tensors["w"], torch.full((100,), 15.0))
        mgr.save({"w": torch.full((100,), 25.0)}, None, step=25, term=1)
        assert [i.step for i in mgr.list()] == [25]  # once older than every kept one, the damaged one goes


def test_a_chunk_found_damaged_is_written_again_by_the_next_save_that_needs_it(tmp_path):
    root = tmp_path / "run"
    with _mgr(f"file://{root}", async_save=False) as mgr:
        mgr.save({"w": torch.zeros(1000)}, None, step=1, term=0)
        mgr.save({"w": torch.ones(1000)}, None, step=2, term=0)
    storage = FsspecStorage(f"file://{root}")
    (cid, _), = decode_manifest(storage.get("manifests/000000000002-00000000.json")).body.chunks
    chunk = root / chunk_path(cid)
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1  # bit rot at rest: same size, so a listing cannot tell
    chunk.write_bytes(bytes(data))
    with _mgr(f"file://{root}", async_save=False) as mgr:
        assert mgr.latest().step == 1  # the run falls back, trains step 2 again, and saves it
        mgr.save({"w": torch.ones(1000)}, None, step=2, term=1)
        assert mgr.reports[-1].chunks_written == 1
        assert torch.equal(mgr.latest().tensors["w"], torch.ones(1000))
        assert torch.equal(mgr.load_manifest("manifests/000000000002-00000000.json").tensors["w"], torch.ones(1000))


def test_transient_errors_are_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert with_retries(flaky, sleep=lambda s: None) == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):  # not transient: raised at once
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), sleep=lambda s: None)


def test_cli_functions_ls_verify_export(tmp_path, monkeypatch):
    monkeypatch.setenv("ET_TEST_KEY", KEY_A)
    uri = f"file://{tmp_path}/run"
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor([1.0], dtype=torch.bfloat16)}
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=EncryptionConfig(key="env:ET_TEST_KEY"),
                                            async_save=False)) as mgr:
        mgr.save(t, None, step=3, term=0)
        mgr.save({k: v + 1 for k, v in t.items()}, None, step=4, term=0)
    infos = list_checkpoints(uri)
    assert [(i.step, i.encrypted) for i in infos] == [(3, True), (4, True)]
    assert verify_checkpoints(uri, ["env:ET_TEST_KEY"]) == [(i.name, None) for i in infos]
    out = tmp_path / "out.safetensors"
    export_checkpoint(uri, str(out), step=3, keys=["env:ET_TEST_KEY"])
    assert _same(load_file(str(out)), t)
    assert out.stat().st_mode & 0o777 == 0o600  # the plaintext of an encrypted run: its owner's only
    with pytest.raises(FileExistsError, match="--force"):  # say, the run's own manifest given by mistake
        export_checkpoint(uri, str(out), step=4, keys=["env:ET_TEST_KEY"])
    assert _same(load_file(str(out)), t)
    export_checkpoint(uri, str(out), step=4, keys=["env:ET_TEST_KEY"], overwrite=True)
    assert _same(load_file(str(out)), {k: v + 1 for k, v in t.items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "run"]  # no temporary left
    from elastictrain.cli import main

    assert main(["ckpt", "verify", uri, "--key", "env:ET_TEST_KEY"]) == 0
    assert main(["ckpt", "export", uri, str(out), "--step", "9", "--key", "env:ET_TEST_KEY", "--force"]) == 1
    assert main(["ckpt", "export", uri, str(out), "--step", "3", "--key", "env:ET_TEST_KEY"]) == 1
    assert main(["ckpt", "export", uri, str(out), "--step", "3", "--key", "env:ET_TEST_KEY", "--force"]) == 0
    assert _same(load_file(str(out)), t)
    assert main(["ckpt", "ls", uri]) == 0
    assert main(["ckpt", "keygen"]) == 0


def test_cli_with_a_signing_key_of_its_own_and_one_line_errors(tmp_path, monkeypatch, capsys):
    from elastictrain.cli import main

    monkeypatch.setenv("ET_TEST_KEY", KEY_A)
    monkeypatch.setenv("ET_SIGN_KEY", KEY_B)
    uri = f"file://{tmp_path}/run"
    enc = EncryptionConfig(key="env:ET_TEST_KEY", signing_key="env:ET_SIGN_KEY")
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=enc, async_save=False)) as mgr:
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
    assert main(["ckpt", "verify", uri, "--key", "env:ET_TEST_KEY"]) == 1  # signed by another key than derived
    assert main(["ckpt", "verify", uri, "--key", "env:ET_TEST_KEY", "--signing-key", "env:ET_SIGN_KEY"]) == 0
    out = tmp_path / "w.safetensors"
    assert main(["ckpt", "export", uri, str(out), "--key", "env:ET_TEST_KEY", "--signing-key", "env:ET_SIGN_KEY"]) == 0
    assert torch.equal(load_file(str(out))["w"], torch.ones(3))
    capsys.readouterr()
    # a backend error that is none of ours (here: an unknown fsspec protocol) is one line, not a traceback
    assert main(["ckpt", "ls", "nosuchprotocol://bucket/run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elastictrain ckpt: ")


def test_cli_export_says_which_newer_checkpoints_it_skipped(tmp_path, monkeypatch, capsys):
    from elastictrain.cli import main

    monkeypatch.setenv("ET_TEST_KEY", KEY_A)
    uri = f"file://{tmp_path}/run"
    enc = EncryptionConfig(key="env:ET_TEST_KEY")
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=enc, async_save=False, chunk_size_mb=1)) as mgr:
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
        mgr.save({"w": torch.full((3,), 2.0)}, None, step=2, term=0)

    def chunk_ids(step):
        name = f"manifests/{step:012d}-00000000.json"
        return {cid for cid, _ in decode_manifest(FsspecStorage(uri).get(name)).body.chunks}

    (chunk,) = chunk_ids(2) - chunk_ids(1)
    path = tmp_path / "run" / chunk_path(chunk)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    out = tmp_path / "w.safetensors"
    assert main(["ckpt", "export", uri, str(out), "--key", "env:ET_TEST_KEY"]) == 0
    captured = capsys.readouterr()
    assert "exported step 1" in captured.out
    assert captured.err.startswith("elastictrain ckpt export: skipped manifests/000000000002-00000000.json: ")
    assert "authentication failed" in captured.err and captured.err.count("\n") == 1
    assert torch.equal(load_file(str(out))["w"], torch.ones(3))


def test_plaintext_never_joins_an_encrypted_run(tmp_path):
    from elastictrain.checkpoint.manifest import encode_manifest

    uri = f"file://{tmp_path}/run"
    with _mgr(uri, async_save=False) as mgr:
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
        run = mgr._identity.keys.run
    with _mgr(uri, enc=False, async_save=False) as plain:  # encryption forgotten in the config
        with pytest.raises(WrongKey, match="holds an encrypted run"):
            plain.save({"w": torch.ones(3)}, None, step=2, term=0)
    assert [i.step for i in list_checkpoints(uri)] == [1]  # nothing written in plaintext
    # a plaintext manifest planted with the run's id by someone who can write to the storage
    with _mgr(f"file://{tmp_path}/other", enc=False, async_save=False) as other:
        other.save({"w": torch.full((3,), 666.0)}, None, step=9, term=0)
    storage = FsspecStorage(uri)
    for name in FsspecStorage(f"file://{tmp_path}/other").list("chunks"):
        storage.put(name, [FsspecStorage(f"file://{tmp_path}/other").get(name)])
    planted = decode_manifest(FsspecStorage(f"file://{tmp_path}/other").get("manifests/000000000009-00000000.json"))
    import dataclasses

    storage.put("manifests/000000000009-00000000.json", [encode_manifest(dataclasses.replace(planted.body, run=run), None)])
    with _mgr(uri, enc=False) as keyless:
        with pytest.raises(CheckpointCorrupt, match="unencrypted but its run.*and 1 older ones failed"):
            keyless.latest()  # the planted one is refused, and the real one needs its key
    with _mgr(uri) as keyed:
        assert torch.equal(keyed.latest().tensors["w"], torch.ones(3))
