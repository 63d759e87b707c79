"""Checkpoints on a real HTTP S3 endpoint (moto server) with the data key wrapped by KMS on the same server."""

from __future__ import annotations

import base64
from collections import Counter

import pytest
import torch

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from elastictrain.checkpoint import CheckpointManager  # noqa: E402
from elastictrain.checkpoint.cli import export_checkpoint, list_checkpoints  # noqa: E402
from elastictrain.config import CheckpointConfig, EncryptionConfig  # noqa: E402
from elastictrain.errors import WrongKey  # noqa: E402


@pytest.fixture(scope="module")
def fsspec_loop():
    """s3fs runs on fsspec's process-wide event-loop thread; start it before any test's thread baseline."""
    import fsspec.asyn

    return fsspec.asyn.get_loop()


@pytest.fixture
def moto_endpoint(monkeypatch, fsspec_loop, s3_server):
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(4, thread_name_prefix="test-s3-executor")
    fsspec_loop.call_soon_threadsafe(fsspec_loop.set_default_executor, executor)  # stopped at teardown
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    try:
        yield s3_server
    finally:
        executor.shutdown(wait=True)


def _s3_config(endpoint, bucket, **kw):
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False, "skip_instance_cache": True}
    return dict(uri=f"s3://{bucket}/runs/r1", storage_options=opts, chunk_size_mb=1, **kw)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_s3_with_kms_round_trip_incremental_and_resume(moto_endpoint, tmp_path):
    kms = boto3.client("kms", endpoint_url=moto_endpoint)
    key_id = kms.create_key(Description="elastictrain test")["KeyMetadata"]["KeyId"]
    other_key = kms.create_key(Description="another")["KeyMetadata"]["KeyId"]
    cfg = CheckpointConfig(**_s3_config(moto_endpoint, "ckpt", io_threads=4,
                                        encryption=EncryptionConfig(key=f"kms:{key_id}")))
    t = {f"layer_weight_{i}": torch.randn(300_000) for i in range(4)}  # 1.2 MB each: two pieces per tensor
    with CheckpointManager(cfg) as mgr:
        mgr.save(t, {"k": 1}, step=1, term=0)
        mgr.wait()
        full = mgr.reports[-1]
        t["layer_weight_2"][0] += 1.0
        mgr.save(t, {"k": 2}, step=2, term=0)
        mgr.wait()
        assert full.chunks_written == 8 and mgr.reports[-1].chunks_written == 1
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/r1/")["Contents"]]
    stored = b"".join(s3.get_object(Bucket="ckpt", Key=k)["Body"].read() for k in keys)
    assert len(stored) > 4_800_000 and b"layer_weight_" not in stored
    assert bytes(t["layer_weight_0"][:8].numpy().data) not in stored
    with CheckpointManager(cfg) as again:  # a resubmitted job unwraps the same data key through KMS
        loaded = again.latest()
        assert loaded.step == 2 and loaded.skeleton == {"k": 2} and _same(loaded.tensors, t)
        t["layer_weight_3"][0] += 1.0
        again.save(t, None, step=3, term=1)
        again.wait()
        assert again.reports[-1].chunks_written == 1
    wrong = cfg.model_copy(update={"encryption": EncryptionConfig(key=f"kms:{other_key}")})
    with CheckpointManager(wrong) as mgr:
        with pytest.raises(WrongKey):
            mgr.latest()
    assert [i.step for i in list_checkpoints(cfg.uri, cfg.storage_options)] == [1, 2, 3]
    out = tmp_path / "x.safetensors"
    export_checkpoint(cfg.uri, str(out), step=2, keys=[f"kms:{key_id}"], storage_options=cfg.storage_options)
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(t)


def test_s3_plain_with_retention(moto_endpoint):
    cfg = CheckpointConfig(**_s3_config(moto_endpoint, "plain", keep_last=1, async_save=False))
    with CheckpointManager(cfg) as mgr:
        for step in (1, 2, 3):
            mgr.save({"w": torch.full((10,), float(step)), "fixed": torch.ones(5)}, None, step=step, term=0)
        assert [i.step for i in mgr.list()] == [3]
        assert len(mgr.storage.list("chunks")) == 2
        assert torch.equal(mgr.latest().tensors["w"], torch.full((10,), 3.0))


def _requests(storage) -> Counter:
    """Every S3 request the storage's client makes from now on, by operation name."""
    from fsspec.asyn import sync

    fs = storage.fs
    sync(fs.loop, fs.set_session)
    counts: Counter = Counter()
    fs.s3.meta.events.register("before-call.s3.*", lambda event_name, **_: counts.update([event_name.split(".")[-1]]))
    return counts


def test_an_incremental_save_and_a_restore_on_s3_make_only_the_requests_they_need(moto_endpoint):
    # every request is a round trip to the bucket (tens of ms on a real one): a save lists the chunks
    # (what is stored already), writes what changed and its manifest, lists and reads the manifests
    # (retention: all at once), deletes a retired manifest, then its chunks in one batch; no read asks
    # for an object's size first
    env = {"KEY": base64.b64encode(bytes(range(32))).decode()}
    cfg = CheckpointConfig(**_s3_config(moto_endpoint, "requests", keep_last=2,
                                        encryption=EncryptionConfig(key="env:KEY")))
    state = {f"w{i}": torch.full((1000,), float(i)) for i in range(6)}
    with CheckpointManager(cfg, environ=env) as mgr:
        mgr.save(state, None, step=1, term=0)
        mgr.wait()
        counts = _requests(mgr.storage)
        for step in (2, 3, 4):
            state["w0"] += 0.25  # a value no other tensor holds: a new chunk
            counts.clear()
            mgr.save(state, None, step=step, term=0)
            mgr.wait()
            expected = {"ListObjectsV2": 2, "PutObject": 2, "GetObject": min(step, 3)}
            if step >= 3:  # keep_last=2: the oldest manifest goes, then (in a batch) the chunk only it used
                expected.update(DeleteObject=1, DeleteObjects=1)
            assert dict(counts) == expected, step
        assert [i.step for i in mgr.list()] == [3, 4]
        assert len(mgr.storage.list("chunks")) == 7  # w0 of steps 3 and 4, w1-w5
    with CheckpointManager(cfg, environ=env) as fresh:
        counts = _requests(fresh.storage)
        loaded = fresh.latest()
        # the run file, the manifest list, the newest manifest, then one read per chunk
        assert dict(counts) == {"GetObject": 1 + 1 + 6, "ListObjectsV2": 1}
        assert loaded.step == 4 and _same(loaded.tensors, state)


def test_s3_storage_reads_each_object_in_one_request_and_discards_in_batches(moto_endpoint):
    from elastictrain.checkpoint.storage import FsspecStorage

    cfg = _s3_config(moto_endpoint, "objects")
    storage = FsspecStorage(cfg["uri"], cfg["storage_options"])
    for name, data in (("chunks/a", b"abc"), ("chunks/big", bytes(range(256)) * 8192), ("chunks/empty", b"")):
        storage.put(name, [data])
    counts = _requests(storage)
    assert storage.get("chunks/a") == b"abc" and storage.get("chunks/big") == bytes(range(256)) * 8192
    assert dict(counts) == {"GetObject": 2}
    counts.clear()
    assert storage.get("chunks/empty") == b""  # no byte 0 to start a range at: read again without one,
    assert counts["GetObject"] == 2  # not retried as a transient error
    with pytest.raises(FileNotFoundError):
        storage.get("chunks/absent")
    counts.clear()
    assert storage.get("chunks/big", size=2 * 2**20) == bytes(range(256)) * 8192  # a size hint up to s3fs's
    assert dict(counts) == {"GetObject": 1}  # block size: still one GET
    counts.clear()
    storage.fs.default_block_size = 2**20  # over it, s3fs reads in parallel ranges (after a HEAD)
    assert storage.get("chunks/big", size=2 * 2**20) == bytes(range(256)) * 8192
    assert dict(counts) == {"HeadObject": 1, "GetObject": 2}
    counts.clear()
    storage.discard(["chunks/a", "chunks/absent", "chunks/big"])
    assert dict(counts) == {"DeleteObjects": 1}
    storage.delete(["chunks/empty", "chunks/absent"])  # checked, one request per key
    assert dict(counts) == {"DeleteObjects": 1, "DeleteObject": 2}
    assert storage.list("chunks") == {}


def test_kms_alias_moved_to_a_new_key_still_opens_what_the_old_key_wrapped(moto_endpoint):
    kms = boto3.client("kms", endpoint_url=moto_endpoint)
    first = kms.create_key(Description="first")["KeyMetadata"]
    second = kms.create_key(Description="second")["KeyMetadata"]
    kms.create_alias(AliasName="alias/train", TargetKeyId=first["KeyId"])
    cfg = CheckpointConfig(**_s3_config(moto_endpoint, "alias", async_save=False,
                                        encryption=EncryptionConfig(key="kms:alias/train")))
    with CheckpointManager(cfg) as mgr:
        mgr.save({"w": torch.ones(4)}, None, step=1, term=0)
    assert [i.key_id for i in list_checkpoints(cfg.uri, cfg.storage_options)] == [f"kms:{first['Arn']}"]
    kms.update_alias(AliasName="alias/train", TargetKeyId=second["KeyId"])  # the key is rotated
    with CheckpointManager(cfg) as mgr:  # the alias now names another key: say which one is missing
        with pytest.raises(WrongKey, match="old_keys"):
            mgr.latest()
    rotated = cfg.model_copy(update={"encryption": EncryptionConfig(key="kms:alias/train",
                                                                    old_keys=[f"kms:{first['KeyId']}"])})
    with CheckpointManager(rotated) as mgr:
        assert torch.equal(mgr.latest().tensors["w"], torch.ones(4))
        mgr.save({"w": torch.full((4,), 2.0)}, None, step=2, term=1)
    assert [i.key_id for i in list_checkpoints(cfg.uri, cfg.storage_options)] == [
        f"kms:{first['Arn']}", f"kms:{second['Arn']}"]


def test_s3_planted_manifests_delete_nothing_and_a_rollback_is_reported(moto_endpoint, caplog):
    # a bucket writer without any key plants copies of the newest manifest under huge steps and under
    # steps inside the kept window, edited ones and one signed by a stranger; later it deletes the newest
    import logging

    from elastictrain.election.store import MemoryStore
    from elastictrain.secret import RunSecret
    from tests.unit.test_ckpt_trust import plant

    kms = boto3.client("kms", endpoint_url=moto_endpoint)
    key_id = kms.create_key(Description="elastictrain planted")["KeyMetadata"]["KeyId"]
    cfg = CheckpointConfig(**_s3_config(moto_endpoint, "kms-planted", keep_last=2, async_save=False,
                                        encryption=EncryptionConfig(key=f"kms:{key_id}")))
    store, secret = MemoryStore(), RunSecret.generate()  # Ray's KV store and the run secret, in a run
    with CheckpointManager(cfg, newest_store=store, run_secret=secret) as mgr:
        for step in (100, 200):
            mgr.save({"w": torch.full((10,), float(step))}, None, step=step, term=0)
        planted = plant(mgr.storage, "manifests/000000000200-00000000.json", near=250)
        for step in (300, 400):
            mgr.save({"w": torch.full((10,), float(step))}, None, step=step, term=0)
        real = [i.step for i in mgr.list() if i.name not in planted]
        assert real == [300, 400] and set(planted) <= {i.name for i in mgr.list()}
        assert mgr.latest().step == 400
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.delete_object(Bucket="kms-planted", Key="runs/r1/manifests/000000000400-00000000.json")  # rolled back
    with caplog.at_level(logging.WARNING, logger="elastictrain.checkpoint"):
        with CheckpointManager(cfg, newest_store=store, run_secret=secret) as resumed:
            loaded = resumed.latest()
    assert loaded.step == 300 and torch.equal(loaded.tensors["w"], torch.full((10,), 300.0))
    assert [(e["recorded_step"], e["found_step"]) for e in resumed.events
            if e["kind"] == "checkpoint_rollback"] == [(400, 300)]
    assert any("is 400" in r.getMessage() and "step 300" in r.getMessage() for r in caplog.records)
