"""Configuration checked where it is given: a clear error before any worker starts."""

from __future__ import annotations

import pytest

import elastictrain as et
from elastictrain.trainer import actor_options


def _noop(ctx):
    pass


def test_global_batch_smaller_than_max_workers_is_refused_up_front():
    with pytest.raises(ValueError, match="raise global_batch_size to at least 4"):
        et.ElasticTrainer(_noop, scaling=et.ScalingConfig(max_workers=4), batch=et.BatchConfig(global_batch_size=3, micro_batch_size=1))
    et.ElasticTrainer(_noop, scaling=et.ScalingConfig(max_workers=4), batch=et.BatchConfig(global_batch_size=4, micro_batch_size=1))


def test_gpu_resources_are_honoured_or_refused():
    assert actor_options(et.ScalingConfig())["num_gpus"] == 0
    assert actor_options(et.ScalingConfig(use_gpu=True))["num_gpus"] == 1
    options = actor_options(et.ScalingConfig(use_gpu=True, resources_per_worker={"CPU": 2, "GPU": 0.5, "TPU": 1}))
    assert options == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"TPU": 1}}
    with pytest.raises(ValueError, match="set use_gpu=True"):
        et.ScalingConfig(resources_per_worker={"CPU": 1, "GPU": 2})
    with pytest.raises(ValueError, match="use_gpu=True"):
        et.ScalingConfig(use_gpu=True, resources_per_worker={"GPU": 0})


def _longest_shared_run(secret: str, text: str) -> int:
    return max((j - i for i in range(len(secret)) for j in range(i + 1, len(secret) + 1) if secret[i:j] in text),
               default=0)


@pytest.mark.parametrize("where", ["key", "old_keys", "signing_key", "nested"])
def test_a_key_pasted_in_place_of_a_spec_never_reaches_the_error_text(where, capsys):
    from elastictrain.checkpoint.keys import generate_key
    from elastictrain.cli import main
    from elastictrain.config import CheckpointConfig, EncryptionConfig

    secret = generate_key()
    make = {
        "key": lambda: EncryptionConfig(key=secret),
        "old_keys": lambda: EncryptionConfig(key="env:K", old_keys=["env:J", secret]),
        "signing_key": lambda: EncryptionConfig(key="env:K", signing_key=secret),
        "nested": lambda: CheckpointConfig(uri="memory://x", encryption={"key": secret}),
    }[where]
    with pytest.raises(ValueError) as info:
        make()
    assert "not shown" in str(info.value)
    assert _longest_shared_run(secret, str(info.value)) < 6, str(info.value)
    assert _longest_shared_run(secret, repr(info.value)) < 6
    if where == "key":  # the CLI gives the reason on its one line, still without the key
        assert main(["ckpt", "verify", "memory://nothing-here", "--key", secret]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not 'env:VAR', 'file:PATH' or 'kms:KEY_ID'" in err
        assert _longest_shared_run(secret, err) < 6


@pytest.mark.parametrize("uri", ["s3:/bucket/run", "gs:bucket/run", "file:ckpts", "memory:/x"])
def test_a_uri_whose_scheme_lacks_its_slashes_is_refused_not_saved_locally(uri, capsys, tmp_path, monkeypatch):
    from elastictrain.checkpoint.storage import FsspecStorage
    from elastictrain.cli import main
    from elastictrain.config import CheckpointConfig

    monkeypatch.chdir(tmp_path)
    scheme = uri.split(":")[0]
    with pytest.raises(ValueError, match=f"starts with '{scheme}:' but not '{scheme}://'"):
        CheckpointConfig(uri=uri)
    with pytest.raises(ValueError, match="a slash missing"):
        FsspecStorage(uri)
    assert main(["ckpt", "ls", uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a slash missing" in err
    assert list(tmp_path.iterdir()) == []  # nothing written where fsspec would have put it
    for fine in ("s3://bucket/run", "simplecache::s3://bucket/run", "memory://x", "file:///tmp/x", "./s3:/x", "runs"):
        assert CheckpointConfig(uri=fine).uri == fine
