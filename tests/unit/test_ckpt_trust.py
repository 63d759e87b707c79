"""A bucket writer without the key: planted manifests, deleted checkpoints, forged plaintext manifests.

Retention counts and deletes only manifests that verify as the run's own; the newest committed step
is kept outside the storage and a resume that finds less says so; plaintext runs with a signing key
refuse manifests they did not sign.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest
import torch

from elastictrain.checkpoint import CheckpointManager, crypto
from elastictrain.checkpoint.cli import verify_report
from elastictrain.checkpoint.manifest import canonical, decode_manifest, encode_manifest, manifest_name
from elastictrain.checkpoint.newest import KVNewestStep, record_key
from elastictrain.checkpoint.storage import FsspecStorage
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.election.store import MemoryStore
from elastictrain.errors import CheckpointCorrupt

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
SIGN = base64.b64encode(bytes(range(2, 34))).decode()
ENV = {"KEY_A": KEY_A, "KEY_B": KEY_B, "SIGN": SIGN}
HUGE = 10**15

MODES = {
    "encrypted": dict(encryption=EncryptionConfig(key="env:KEY_A")),
    "encrypted+signing_key": dict(encryption=EncryptionConfig(key="env:KEY_A", signing_key="env:SIGN")),
    "signed plaintext": dict(signing_key="env:SIGN"),
}


def _mgr(uri, mode, **kw):
    cfg = dict(uri=uri, chunk_size_mb=1, async_save=False, keep_last=2, **MODES[mode])
    cfg.update(kw)
    return CheckpointManager(CheckpointConfig(**cfg), environ=ENV)


def _w(step: int) -> dict:
    return {"w": torch.full((64,), float(step)), "fixed": torch.ones(16)}


def plant(storage: FsspecStorage, newest: str, near: int) -> list[str]:
    """What a bucket writer without any key can make of the run's newest manifest; the names it wrote.

    Copies go under huge steps and under steps `near`.. (just below the run's next save, inside the window
    retention keeps); the forged ones go under `near`+10.. .
    """
    raw = storage.get(newest)
    doc = json.loads(raw)
    planted = []

    def put(name, data):
        storage.put(name, [data])
        planted.append(name)

    for k in range(3):  # verbatim copies under huge step numbers, and under steps just below the next save
        put(manifest_name(HUGE + k, 0), raw)
        put(manifest_name(near + k, 0), raw)
    for step in (HUGE + 10, near + 10):
        edited = json.loads(raw)  # the step edited to match its new name (the signature no longer verifies)
        edited["body"]["step"] = step
        put(manifest_name(step, 0), canonical(edited))
    for step in (HUGE + 11, near + 11):
        empty = json.loads(raw)  # an empty chunk list
        empty["body"]["step"] = step
        empty["body"]["chunks"] = []
        if empty["body"]["encryption"] is None:
            empty["body"]["table"]["pieces"] = []
        put(manifest_name(step, 0), canonical(empty))
    body = decode_manifest(raw).body
    for step in (HUGE + 12, near + 12):
        # a stale signature: signed, with the run's id and key header, by a key that is not the run's (the
        # signer of another run, or of a rotation no longer in the keyring)
        foreign = dataclasses.replace(body, step=step)
        put(foreign.name, encode_manifest(foreign, crypto.Signer(bytes(range(100, 132)))))
        if doc["body"]["encryption"] is None:  # plaintext: a SHA-256 digest recomputed (unsigned runs accept it)
            digest = dataclasses.replace(body, step=step + 1)
            put(digest.name, encode_manifest(digest, None))
    return planted


@pytest.mark.parametrize("mode", list(MODES))
def test_planted_manifests_delete_nothing_and_latest_is_the_real_newest(mode, tmp_path):
    uri = f"file://{tmp_path}/run"
    storage = FsspecStorage(uri)
    with _mgr(uri, mode) as mgr:
        for step in (100, 200, 300):
            mgr.save(_w(step), None, step=step, term=0)
        planted = plant(storage, manifest_name(300, 0), near=380)
        mgr.save(_w(400), None, step=400, term=0)  # its retention sees every planted manifest
        names = [i.name for i in mgr.list()]
        assert [n for n in names if n not in planted] == [manifest_name(300, 0), manifest_name(400, 0)]
        mgr.save(_w(500), None, step=500, term=0)
        names = [i.name for i in mgr.list()]
        real = [n for n in names if n not in planted]
        assert real == [manifest_name(400, 0), manifest_name(500, 0)]  # keep_last=2 of the real ones
        assert set(planted) <= set(names)  # unverifiable: left in place
        loaded = mgr.latest()
        assert loaded.step == 500 and torch.equal(loaded.tensors["w"], torch.full((64,), 500.0))
        assert {n for n, _ in loaded.skipped} == {n for n in planted if n > manifest_name(500, 0)}
        assert mgr.load(400).step == 400  # still loadable: none of its chunks went
    with _mgr(uri, mode) as fresh:  # a resubmitted job
        assert fresh.latest().step == 500
        fresh.save(_w(600), None, step=600, term=1)
        real = [i.name for i in fresh.list() if i.name not in planted]
        assert real == [manifest_name(500, 0), manifest_name(600, 1)]
    keys = ["env:KEY_A"] if "encrypted" in mode else None
    signing = "env:SIGN" if "SIGN" in str(MODES[mode]) else None
    env = pytest.MonkeyPatch()
    for k, v in ENV.items():
        env.setenv(k, v)
    try:
        report = verify_report(uri, keys, signing_key=signing)
    finally:
        env.undo()
    assert sorted(report.unverifiable) == sorted(planted)
    assert report.verified == [manifest_name(500, 0), manifest_name(600, 1)] and report.newest_step == 600


def test_a_checkpoint_just_committed_is_never_deleted_by_its_own_retention(tmp_path):
    # even keep_last=1 with planted copies far above it: the commit survives its retention
    uri = f"file://{tmp_path}/run"
    storage = FsspecStorage(uri)
    with _mgr(uri, "encrypted", keep_last=1) as mgr:
        mgr.save(_w(10), None, step=10, term=0)
        planted = plant(storage, manifest_name(10, 0), near=11)
        mgr.save(_w(30), None, step=30, term=0)
        assert [i.name for i in mgr.list() if i.name not in planted] == [manifest_name(30, 0)]
        assert mgr.latest().step == 30


def test_unsigned_plaintext_retention_counts_nothing_newer_than_its_commit(tmp_path):
    # without a key nothing is authenticated: a copy with a recomputed digest verifies as well as the
    # run's own manifests. Retention still never lets one newer than the commit push the real ones out.
    uri = f"file://{tmp_path}/run"
    storage = FsspecStorage(uri)
    with CheckpointManager(CheckpointConfig(uri=uri, async_save=False, keep_last=2)) as mgr:
        for step in (1, 2):
            mgr.save(_w(step), None, step=step, term=0)
        body = decode_manifest(storage.get(manifest_name(2, 0))).body
        for k in range(3):
            copy = dataclasses.replace(body, step=HUGE + k)
            storage.put(copy.name, [encode_manifest(copy, None)])
        mgr.save(_w(3), None, step=3, term=0)
        steps = [i.step for i in mgr.list()]
        assert steps[:2] == [2, 3] and len(steps) == 5
        assert mgr.load(2).step == 2


def test_a_resume_that_finds_only_older_checkpoints_says_so(tmp_path, caplog):
    uri = f"file://{tmp_path}/run"
    store = MemoryStore()  # stands for Ray's KV store, under the run's stable namespace
    config = CheckpointConfig(uri=uri, async_save=False, keep_last=5, encryption=EncryptionConfig(key="env:KEY_A"))
    with CheckpointManager(config, environ=ENV, newest_store=store) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(_w(step), None, step=step, term=0)
    storage = FsspecStorage(uri)
    storage.delete([manifest_name(3, 0), manifest_name(4, 0)])  # the storage provider rolls the run back
    with caplog.at_level(logging.WARNING, logger="elastictrain.checkpoint"):
        with CheckpointManager(config, environ=ENV, newest_store=store) as resumed:
            loaded = resumed.latest()
    assert loaded.step == 2  # it still resumes from the newest that verifies
    (rollback,) = [e for e in resumed.events if e["kind"] == "checkpoint_rollback"]
    assert (rollback["recorded_step"], rollback["found_step"]) == (4, 2)
    warning = [r.getMessage() for r in caplog.records if "rollback" in r.getMessage()]
    assert len(warning) == 1 and "is 4" in warning[0] and "step 2" in warning[0]
    # every checkpoint gone: the same, with nothing found
    storage.delete([manifest_name(1, 0), manifest_name(2, 0)])
    with CheckpointManager(config, environ=ENV, newest_store=store) as empty:
        assert empty.latest() is None
    assert [(e["recorded_step"], e["found_step"]) for e in empty.events if e["kind"] == "checkpoint_rollback"] == [
        (4, None)
    ]
    # no rollback: no event
    with CheckpointManager(config.model_copy(update={"uri": f"file://{tmp_path}/other"}), environ=ENV,
                           newest_store=store) as other:
        other.save(_w(7), None, step=7, term=0)
        assert other.latest().step == 7
        assert not [e for e in other.events if e["kind"] == "checkpoint_rollback"]


def test_the_newest_step_record_is_authenticated_and_bound_to_its_uri(tmp_path, caplog):
    store = MemoryStore()
    uri = f"file://{tmp_path}/run"
    config = CheckpointConfig(uri=uri, async_save=False, encryption=EncryptionConfig(key="env:KEY_A"))
    with CheckpointManager(config, environ=ENV, newest_store=store) as mgr:
        mgr.save(_w(1), None, step=1, term=0)
        assert mgr.newest_step.get().step == 1
    # a holder of the Ray token writes a record without the key: ignored with a warning, no event
    KVNewestStep(store, uri, [bytes(32)]).put(HUGE, 0)
    with caplog.at_level(logging.WARNING, logger="elastictrain.checkpoint"):
        with CheckpointManager(config, environ=ENV, newest_store=store) as resumed:
            assert resumed.latest().step == 1
    assert not [e for e in resumed.events if e["kind"] == "checkpoint_rollback"]
    assert any("does not verify" in r.getMessage() for r in caplog.records)
    # a record copied from another URI's key does not verify under this one's
    other = KVNewestStep(store, f"file://{tmp_path}/x", [crypto.derive(crypto.derive(bytes(range(32)), "manifest-signing"), "newest-step")])
    other.put(HUGE, 0)
    store.put(record_key(uri), store.get(other.key))
    with pytest.raises(ValueError, match="does not verify"):
        CheckpointManager(config, environ=ENV, newest_store=store).newest_step.get()
    for junk in (b"{}", b"x" * 5000, b"\xff", json.dumps({"mac": "0", "step": -1, "term": 0}).encode()):
        store.put(record_key(uri), junk)
        with pytest.raises(ValueError):
            CheckpointManager(config, environ=ENV, newest_store=store).newest_step.get()


def test_signed_plaintext_refuses_forged_and_unsigned_manifests(tmp_path):
    uri = f"file://{tmp_path}/run"
    storage = FsspecStorage(uri)
    with _mgr(uri, "signed plaintext") as mgr:
        mgr.save(_w(1), None, step=1, term=0)
        doc = json.loads(storage.get(manifest_name(1, 0)))
        assert doc["signature"]["alg"] == "ed25519" and doc["body"]["encryption"] is None
    body = decode_manifest(storage.get(manifest_name(1, 0))).body
    forged_w = dataclasses.replace(body, step=2)
    storage.put(forged_w.name, [encode_manifest(forged_w, None)])  # unsigned: a recomputed digest
    other = dataclasses.replace(body, step=3)
    storage.put(other.name, [encode_manifest(other, crypto.Signer(bytes(32)))])  # signed by another key
    with _mgr(uri, "signed plaintext") as reader:
        loaded = reader.latest()
        assert loaded.step == 1 and len(loaded.skipped) == 2
        with pytest.raises(CheckpointCorrupt, match="not signed"):
            reader.load(2)
        with pytest.raises(CheckpointCorrupt, match="does not verify"):
            reader.load(3)
    with _mgr(uri, "signed plaintext", signing_key="env:KEY_B") as wrong:  # the wrong signing key
        with pytest.raises(CheckpointCorrupt, match="does not verify"):
            wrong.load(1)


def test_plaintext_signing_key_is_validated_without_echoing_it():
    with pytest.raises(ValueError) as err:
        CheckpointConfig(uri="memory://x", signing_key=KEY_A)
    assert KEY_A not in str(err.value) and "not shown" in str(err.value)
    with pytest.raises(ValueError, match="EncryptionConfig.signing_key"):
        CheckpointConfig(uri="memory://x", signing_key="env:SIGN", encryption=EncryptionConfig(key="env:KEY_A"))
    assert CheckpointConfig(uri="memory://x", signing_key="file:/k").signing_key == "file:/k"


def test_cli_verify_lists_unverifiable_manifests_and_reports_the_gap(tmp_path, monkeypatch, capsys):
    from elastictrain.cli import main

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    uri = f"file://{tmp_path}/run"
    with _mgr(uri, "encrypted", keep_last=5) as mgr:
        for step in (1, 2, 3):
            mgr.save(_w(step), None, step=step, term=0)
    storage = FsspecStorage(uri)
    storage.put(manifest_name(HUGE, 0), [storage.get(manifest_name(3, 0))])
    storage.delete([manifest_name(3, 0)])
    capsys.readouterr()
    assert main(["ckpt", "verify", uri, "--key", "env:KEY_A", "--expect-step", "3"]) == 1
    out = capsys.readouterr().out
    assert f"{manifest_name(HUGE, 0)}: UNVERIFIABLE" in out
    assert f"2 verified, 1 unverifiable (left in place by retention): {manifest_name(HUGE, 0)}, 0 damaged" in out
    assert "newest verified: step 2; expected: step 3 (rolled back" in out
    assert main(["ckpt", "verify", uri, "--key", "env:KEY_A", "--expect-step", "2"]) == 1  # the planted one
    storage.delete([manifest_name(HUGE, 0)])
    assert main(["ckpt", "verify", uri, "--key", "env:KEY_A", "--expect-step", "2"]) == 0
    # a signed plaintext run, from the command line with its signing key alone
    plain = f"file://{tmp_path}/plain"
    with _mgr(plain, "signed plaintext") as mgr:
        mgr.save(_w(1), None, step=1, term=0)
    assert main(["ckpt", "verify", plain, "--signing-key", "env:SIGN"]) == 0
    assert main(["ckpt", "verify", plain, "--signing-key", "env:KEY_B"]) == 1
