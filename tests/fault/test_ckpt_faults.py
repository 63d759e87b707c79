"""A save crashing at every write, and damaged stored bytes: never a wrong model, always a clear error."""

from __future__ import annotations

import base64
import uuid

import pytest
import torch

from elastictrain.checkpoint import CheckpointManager
from elastictrain.checkpoint.manifest import decode_manifest
from elastictrain.checkpoint.storage import FsspecStorage
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.errors import CheckpointCorrupt, CheckpointError, WrongKey

ENV = {"K": base64.b64encode(bytes(range(32))).decode()}


class Crash(Exception):
    """The storage 'dies' in the middle of a write."""


class FailingStorage:
    """Delegates to real storage; write number `fail_at` fails (optionally leaving half the bytes behind)."""

    def __init__(self, inner: FsspecStorage, fail_at: int | None, truncate: bool):
        self.inner, self.fail_at, self.truncate = inner, fail_at, truncate
        self.uri = inner.uri
        self.writes = 0

    def put(self, name, parts):
        index, self.writes = self.writes, self.writes + 1
        if index == self.fail_at:
            if self.truncate:
                data = b"".join(bytes(p) for p in parts)
                self.inner.put(name, [data[: len(data) // 2]])
            raise Crash(f"storage failed writing {name}")
        self.inner.put(name, parts)

    def get(self, name, size=None):
        return self.inner.get(name, size)

    def view(self, name):
        return self.inner.view(name)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, names):
        self.inner.delete(names)


def _cfg(uri, encrypted=True, **kw):
    enc = EncryptionConfig(key="env:K") if encrypted else None
    return CheckpointConfig(uri=uri, encryption=enc, chunk_size_mb=1, keep_last=1, **kw)


def _state(value: float):
    return {"a": torch.full((300_000,), value), "b": torch.arange(1000) * value, "c": torch.tensor(value)}


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("truncate", [False, True])
def test_crash_at_every_write_keeps_the_previous_checkpoint(encrypted, truncate):
    def fresh():
        uri = f"memory://fault-{uuid.uuid4().hex}"
        with CheckpointManager(_cfg(uri, encrypted), environ=ENV) as mgr:
            mgr.save(_state(1.0), {"v": 1}, step=1, term=0)
        return uri

    counting = FailingStorage(FsspecStorage(fresh()), None, False)
    with CheckpointManager(_cfg(counting.uri, encrypted), storage=counting, environ=ENV) as mgr:
        mgr.save(_state(2.0), {"v": 2}, step=2, term=0)
        mgr.wait()
    total = counting.writes
    assert total >= 4  # chunks + the manifest
    for fail_at in range(total):
        uri = fresh()
        failing = FailingStorage(FsspecStorage(uri), fail_at, truncate)
        with CheckpointManager(_cfg(uri, encrypted), storage=failing, environ=ENV) as mgr:
            mgr.save(_state(2.0), {"v": 2}, step=2, term=0)
            with pytest.raises(Crash):
                mgr.wait()
        with CheckpointManager(_cfg(uri, encrypted), environ=ENV) as mgr:
            loaded = mgr.latest()
            assert loaded.step == 1 and loaded.skeleton == {"v": 1}, fail_at
            assert all(torch.equal(loaded.tensors[k], v) for k, v in _state(1.0).items())
            mgr.save(_state(3.0), {"v": 3}, step=3, term=0)  # leftovers do not poison the next save
            mgr.wait()
        with CheckpointManager(_cfg(uri, encrypted), environ=ENV) as mgr:
            loaded = mgr.latest()
            assert loaded.step == 3 and all(torch.equal(loaded.tensors[k], v) for k, v in _state(3.0).items())


def _saved(encrypted=True, where=None):
    """Two checkpoints (steps 1 and 2) on memory://, or in the folder `where` (local files are memory-mapped)."""
    uri = f"memory://fault-{uuid.uuid4().hex}" if where is None else f"file://{where}"
    cfg = CheckpointConfig(uri=uri, encryption=EncryptionConfig(key="env:K") if encrypted else None,
                           chunk_size_mb=1, async_save=False)
    with CheckpointManager(cfg, environ=ENV) as mgr:
        mgr.save(_state(1.0), None, step=1, term=0)
        mgr.save(_state(2.0), None, step=2, term=0)
    return cfg, FsspecStorage(uri)


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("encrypted", [True, False])
def test_bit_flip_in_any_chunk_is_caught(encrypted, local, tmp_path):
    cfg, storage = _saved(encrypted, tmp_path if local else None)
    chunks = sorted(storage.list("chunks"))
    for name in chunks:
        original = storage.get(name)
        for pos in (0, 4, 5, len(original) // 2, len(original) - 1):
            bad = bytearray(original)
            bad[pos] ^= 0x10
            storage.put(name, [bytes(bad)])
            with CheckpointManager(cfg, environ=ENV) as mgr:
                for step in (1, 2):
                    try:
                        loaded = mgr.load(step)
                    except CheckpointCorrupt:
                        continue
                    assert all(torch.equal(loaded.tensors[k], v) for k, v in _state(float(step)).items())
        storage.put(name, [original])
    with CheckpointManager(cfg, environ=ENV) as mgr:
        assert mgr.latest().step == 2


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("damage", ["truncate", "delete", "empty"])
def test_truncated_or_missing_chunk_falls_back(damage, local, tmp_path):
    cfg, storage = _saved(where=tmp_path if local else None)
    step1 = decode_manifest(storage.get("manifests/000000000001-00000000.json")).body
    ids1 = {cid for cid, _ in step1.chunks}
    victims = sorted(c for c in storage.list("chunks") if c.rsplit("/", 1)[-1] not in ids1)  # step 2's own
    assert victims
    name = victims[0]
    if damage == "delete":
        storage.delete([name])
    else:
        data = storage.get(name)
        storage.put(name, [data[: len(data) // 3] if damage == "truncate" else b""])
    with CheckpointManager(cfg, environ=ENV) as mgr:
        loaded = mgr.latest()
        assert loaded.step == 1
        assert "missing" in loaded.skipped[0][1] or "truncated" in loaded.skipped[0][1]
        with pytest.raises(CheckpointCorrupt):
            mgr.load(2)
        # restoring in place: the damaged step 2 may have written into the tensors, step 1 then overwrote all
        into = {k: torch.full_like(v, -7.0) for k, v in _state(1.0).items()}
        loaded = mgr.latest(into=into)
        assert loaded.step == 1 and all(torch.equal(into[k], v) for k, v in _state(1.0).items())


def test_manifest_from_another_run_or_renamed_is_refused():
    cfg, storage = _saved()
    other_cfg, other = _saved()
    with CheckpointManager(other_cfg, environ=ENV) as foreign:  # same key, another run
        foreign.save(_state(9.0), None, step=9, term=0)
    for name, _ in other.list("chunks").items():
        storage.put(name, [other.get(name)])
    storage.put("manifests/000000000009-00000000.json", [other.get("manifests/000000000009-00000000.json")])
    storage.put("manifests/000000000008-00000000.json", [storage.get("manifests/000000000002-00000000.json")])
    with CheckpointManager(cfg, environ=ENV) as mgr:
        loaded = mgr.latest()
        assert loaded.step == 2
        reasons = dict(loaded.skipped)
        assert "another run" in reasons["manifests/000000000009-00000000.json"]
        assert "renamed" in reasons["manifests/000000000008-00000000.json"]


def test_run_file_swapped_while_the_run_goes_on_is_ignored():
    """Another run under the same key, planted whole (run.json too) next to a live manager's run:
    the manager keeps restoring its own run, whose id it already knows."""
    cfg, storage = _saved()
    other_cfg, other = _saved()
    with CheckpointManager(other_cfg, environ=ENV) as foreign:
        foreign.save(_state(9.0), None, step=9, term=0)
    with CheckpointManager(cfg, environ=ENV) as mgr:
        assert mgr.latest().step == 2  # the manager now knows its run
        mgr.save(_state(3.0), None, step=3, term=0)
        for name in [*other.list("chunks"), *other.list("manifests")]:
            storage.put(name, [other.get(name)])
        storage.put("run.json", [other.get("run.json")])
        loaded = mgr.latest()
        assert loaded.step == 3 and torch.equal(loaded.tensors["a"], _state(3.0)["a"])
        assert all("another run" in reason for _, reason in loaded.skipped) and loaded.skipped


def test_run_file_swapped_after_the_first_restore_is_ignored():
    cfg, storage = _saved()
    other_cfg, other = _saved()
    with CheckpointManager(other_cfg, environ=ENV) as foreign:
        foreign.save(_state(9.0), None, step=9, term=0)
    with CheckpointManager(cfg, environ=ENV) as mgr:
        assert mgr.latest().step == 2  # read run.json; nothing saved yet
        storage.put("run.json", [other.get("run.json")])
        storage.put("manifests/000000000009-00000000.json", [other.get("manifests/000000000009-00000000.json")])
        for name in other.list("chunks"):
            storage.put(name, [other.get(name)])
        assert mgr.latest().step == 2
        mgr.save(_state(3.0), None, step=3, term=0)  # saved into the run it restored, not the planted one
        assert mgr.latest().step == 3

def test_unencrypted_manifest_in_an_encrypted_run_is_refused():
    import dataclasses

    from elastictrain.checkpoint.manifest import encode_manifest

    cfg, storage = _saved()
    plain_cfg = CheckpointConfig(uri=cfg.uri, chunk_size_mb=1, async_save=False)
    with CheckpointManager(plain_cfg, environ=ENV) as plain:
        with pytest.raises(WrongKey, match="holds an encrypted run"):  # a config that forgot its key
            plain.save(_state(9.0), None, step=9, term=0)
    other = FsspecStorage(f"memory://ckpt-{uuid.uuid4().hex}")
    with CheckpointManager(plain_cfg.model_copy(update={"uri": other.uri}), environ=ENV) as plain:
        plain.save(_state(9.0), None, step=9, term=0)
    for name in other.list("chunks"):
        storage.put(name, [other.get(name)])
    run = decode_manifest(storage.get(sorted(storage.list("manifests"))[0])).body.run
    body = decode_manifest(other.get("manifests/000000000009-00000000.json")).body
    storage.put("manifests/000000000009-00000000.json", [encode_manifest(dataclasses.replace(body, run=run), None)])
    with CheckpointManager(cfg, environ=ENV) as mgr:  # a downgrade planted in the same run
        loaded = mgr.latest()
        assert loaded.step == 2 and "unencrypted" in loaded.skipped[0][1]



def test_every_manifest_damaged_raises_instead_of_starting_over():
    cfg, storage = _saved()
    for name in storage.list("manifests"):
        storage.put(name, [storage.get(name)[:-5]])
    with CheckpointManager(cfg, environ=ENV) as mgr:
        with pytest.raises(CheckpointError, match="no checkpoint verifies"):
            mgr.latest()
