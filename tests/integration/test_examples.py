"""The examples a researcher copies run end to end in a short mode: char GPT with encrypted checkpoints
and autoresume on S3 (a local moto server), a Hugging Face model exported. The minimal loop trains and
checkpoints as a `ray job submit` job in test_job_submit.py (one Ray start checks both)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_GPT = ["--every", "3", "--batch", "8", "--micro-batch", "4", "--context", "32", "--dim", "32",
            "--layers", "1", "--heads", "2", "--corpus-bytes", "200000", "--sample-bytes", "16", "--warmup", "2"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run a command in its own session; on overrun kill its whole process group (Ray included)."""
    proc = subprocess.Popen(args, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args} overran {timeout} s\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res.stdout


def _keygen(tmp_path: Path) -> Path:
    key = tmp_path / "run.key"
    key.write_text(_ok(_run([sys.executable, "-m", "elastictrain", "ckpt", "keygen"], timeout=60)))
    return key


@pytest.fixture
def moto_s3(s3_server):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="runs")
    return s3_server, client


def test_char_gpt_encrypted_on_s3_resumes_where_it_stopped(tmp_path, moto_s3):
    """One pair of runs checks it all (each run costs a Ray start): the example's encrypted checkpoint on S3
    resumes, nothing of it is stored in plaintext, and `ckpt verify` refuses it under another key."""
    endpoint, s3 = moto_s3
    key = _keygen(tmp_path)
    uri = "s3://runs/char-gpt"
    args = [sys.executable, "examples/char_gpt.py", "--uri", uri, "--endpoint-url", endpoint,
            "--key", f"file:{key}", *TINY_GPT]
    first = _ok(_run(args + ["--steps", "3"]))
    assert "started from scratch" in first and "steps=3 " in first and "encrypted=True" in first
    second = _ok(_run(args + ["--steps", "5"]))
    assert "resumed from checkpoint at step 3" in second and "steps=5 " in second
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="char-gpt/")["Contents"]]
    assert keys and all(k.startswith("char-gpt/") for k in keys)
    stored = b"".join(s3.get_object(Bucket="runs", Key=k)["Body"].read() for k in keys)
    assert b"blocks.0.qkv" not in stored  # tensor names are encrypted at rest
    # the wrong key is refused with a clear reason, not a wrong model (the CLI finds the endpoint the AWS way)
    other = tmp_path / "other.key"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    bad = _run([sys.executable, "-m", "elastictrain", "ckpt", "verify", uri, "--key", f"file:{other}"], timeout=60,
               AWS_ENDPOINT_URL=endpoint)
    assert bad.returncode != 0 and "WrongKey" in bad.stderr, bad.stderr


def test_hf_causal_lm_trains_and_exports_for_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")  # in the `test` extra; CI fails on any skip
    transformers.utils.logging.disable_progress_bar()  # its tqdm monitor thread would outlive the test
    uri, out = f"file://{tmp_path}/hf", tmp_path / "hf-model"
    res = _ok(_run([sys.executable, "examples/hf_causal_lm.py", "--uri", uri, "--steps", "4", "--every", "2",
                    "--workers", "2", "--export", str(out)], timeout=180))
    assert "steps=4 " in res and f"exported step 4 to {out}" in res
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.n_layer == 2 and model.config.vocab_size == 64
