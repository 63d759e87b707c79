"""A real `fit()` with an encrypted checkpoint on S3 (moto server): neither the checkpoint key nor the storage
credentials reach a log line, an event, the Result or any file of the Ray session.

The second test plants the key in a worker's output and shows the same search finds it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import uuid

import pytest

import elastictrain as et
from elastictrain.secret import RunSecret
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.conftest import _wait_for
from tests.toy_runs import BATCH, FAILURE

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

ACCESS_KEY_ID = "AKIA" + secrets.token_hex(8).upper()
STORAGE_SECRET = "et-storage-" + secrets.token_urlsafe(24)


@pytest.fixture
def key(tmp_path):
    """A random checkpoint key in a key file; yields (spec, raw bytes)."""
    raw = secrets.token_bytes(32)
    path = tmp_path / "run.key"
    path.write_text(base64.b64encode(raw).decode())
    return f"file:{path}", raw


def _needles(raw_key: bytes) -> dict[str, bytes]:
    """Every form of the secrets the search looks for."""
    hexed = binascii.hexlify(raw_key)
    return {
        "key (raw)": raw_key,
        "key (base64)": base64.b64encode(raw_key),
        "key (url-safe base64)": base64.urlsafe_b64encode(raw_key).rstrip(b"="),
        "key (hex)": hexed,
        "key (HEX)": hexed.upper(),
        "storage secret": STORAGE_SECRET.encode(),
        "storage access key id": ACCESS_KEY_ID.encode(),
    }


def _session_files() -> list[str]:
    import ray

    root = ray._private.worker._global_node.get_session_dir_path()
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(path)
    return found


def _search_session(needles: dict[str, bytes]) -> dict[str, list[str]]:
    """{needle name: session files that hold it}."""
    hits: dict[str, list[str]] = {}
    for path in _session_files():
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue  # a socket or a file removed while listed
        for name, needle in needles.items():
            if needle in data:
                hits.setdefault(name, []).append(path)
    return hits


def _wait_for_session_text(marker: bytes, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until a worker's output holding `marker` is in the session's log files: every line a
    worker wrote before it is there too."""
    if _wait_for(lambda: bool(_search_session({"marker": marker})), timeout=timeout_s, interval=0.2):
        return
    pytest.fail(f"worker output {marker!r} did not reach the Ray session's log files within {timeout_s} s")


def _logging_to_stderr(train_fn):
    """`train_fn` that first sends elastictrain's own log records on its worker, down to DEBUG, to stderr: into
    the session's files, where the search looks."""

    def logged(ctx) -> None:
        logger = logging.getLogger("elastictrain")
        if not any(getattr(h, "et_test", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.et_test = True
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        train_fn(ctx)

    return logged


def _print_at_last_step(total_steps: int, key_path: str | None, marker: str):
    """An `on_step` for the toy loop: rank 0 prints `marker` after the last step; with `key_path` it also
    prints the key (base64 and hex) and logs the storage secret: the planted leak."""

    def on_step(ctx, step: int) -> None:
        if step != total_steps - 1 or ctx.rank != 0:
            return
        if key_path is not None:
            with open(key_path) as fh:
                b64 = fh.read().strip()
            print(f"planted: {b64} {base64.b64decode(b64).hex()}", flush=True)
            logging.getLogger("user.code").warning("planted: %s %s", STORAGE_SECRET, ACCESS_KEY_ID)
        print(marker, flush=True)

    return on_step


def _fit_on_s3(
    endpoint: str, bucket: str, key_spec: str, on_step, task: ToyTask
) -> tuple[et.Result, et.CheckpointConfig]:
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    ckpt = et.CheckpointConfig(
        uri=f"s3://{bucket}/runs/r1", every_steps=2, keep_last=2, chunk_size_mb=1,
        encryption=et.EncryptionConfig(key=key_spec),
        storage_options={  # the workers have no AWS settings: everything they need is here
            "key": ACCESS_KEY_ID, "secret": STORAGE_SECRET, "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        },
    )
    result = et.ElasticTrainer(
        _logging_to_stderr(make_train_fn(task, on_step=on_step)),
        scaling=et.ScalingConfig(min_workers=2, max_workers=2), batch=BATCH, checkpoint=ckpt, failure=FAILURE,
    ).fit()
    return result, ckpt


def _result_text(result: et.Result) -> str:
    return "\n".join([
        repr(result), str(result), json.dumps(result.events, default=repr),
        json.dumps(list(result.history), default=repr), json.dumps(result.metrics, default=repr),
    ])


def _stored_objects(endpoint: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_fit_with_an_encrypted_checkpoint_on_s3_leaks_no_key_and_no_storage_credential(
    ray_session, s3_server, key, caplog, capfd
):
    key_spec, raw = key
    caplog.set_level(logging.DEBUG, logger="elastictrain")
    caplog.set_level(logging.INFO)
    marker = f"et-marker-{uuid.uuid4().hex}"
    task = ToyTask(total_steps=6)
    bucket = f"secrets-clean-{uuid.uuid4().hex[:8]}"  # the S3 server is shared by the session's tests
    result, ckpt = _fit_on_s3(s3_server, bucket, key_spec, _print_at_last_step(task.total_steps, None, marker), task)

    assert result.steps == 6
    assert any(e["kind"] == "checkpoint" for e in result.events)  # the run did save to S3
    assert any(k.startswith("runs/r1/manifests/") for k in _stored_objects(s3_server, bucket))
    _wait_for_session_text(marker.encode())  # what the workers printed up to the end of training is on disk
    _wait_for_session_text(b"checkpoint checkpoint {")  # and the leader's checkpoint manager logged its saves

    needles = _needles(raw)
    run_secret = RunSecret(derive_from=key_spec).key()  # the run's election and rendezvous secret, derived from the key
    needles.update({"run secret (raw)": run_secret, "run secret (base64)": base64.b64encode(run_secret),
                    "run secret (hex)": binascii.hexlify(run_secret)})
    out, err = capfd.readouterr()
    texts = {
        "driver log records": "\n".join(r.getMessage() + repr(r.args) for r in caplog.records),
        "driver log text": caplog.text,
        "driver stdout": out,
        "driver stderr": err,
        "result": _result_text(result),
        "config repr": repr(ckpt) + str(ckpt),
    }
    leaks = [(name, where) for where, text in texts.items() for name, needle in needles.items()
             if needle.decode("latin-1") in text]
    assert not leaks, f"secrets found: {leaks}"
    assert caplog.records or result.events  # something was searched
    session_hits = _search_session(needles)
    assert not session_hits, f"secrets found in the Ray session's files: {session_hits}"


def test_the_search_finds_a_key_a_worker_prints(ray_session, s3_server, key):
    """The planted leak: the same search over the session's files finds the key and the storage secret."""
    key_spec, raw = key
    marker = f"et-marker-{uuid.uuid4().hex}"
    task = ToyTask(total_steps=2)
    result, _ = _fit_on_s3(
        s3_server, f"secrets-leak-{uuid.uuid4().hex[:8]}", key_spec,
        _print_at_last_step(task.total_steps, key_spec[len("file:"):], marker), task,
    )
    assert result.steps == 2
    _wait_for_session_text(marker.encode())
    hits = _search_session(_needles(raw))
    for name in ("key (base64)", "key (hex)", "storage secret", "storage access key id"):
        assert hits.get(name), f"the planted {name} was not found: {sorted(hits)}"
