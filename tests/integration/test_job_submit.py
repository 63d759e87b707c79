"""A run submitted from CI as a Ray job: `ray start --head`, `ray job submit`, SUCCEEDED,
logs, checkpoint; a broken training loop ends its job FAILED with the reason in the logs.

The cluster is private to the test: its own HOME (so its own ~/.ray/auth_token), its
own --temp-dir and free ports. It is stopped by killing its own processes only.
`ray stop` is not used: it selects processes by name and would kill every Ray
process on the machine, other test sessions' included.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import _wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "ELASTICTRAIN_TEST_CLUSTER"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(tag: str) -> list[int]:
    """Processes whose environment carries this cluster's marker (the job entrypoints included,
    which Ray starts in sessions of their own)."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _stop(head: subprocess.Popen, tag: str) -> None:
    """Stop only this cluster: SIGTERM `ray start --block` (it stops what it started), then
    SIGKILL its process group and any process left with the marker."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(3):
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _marked_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        if not _marked_pids(tag):
            break
    if head.poll() is None:
        head.kill()
    head.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def ray_head():
    """A private head node with the dashboard (the job API) on a free port; yields (address, env)."""
    root = Path(tempfile.mkdtemp(prefix="etjob-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    tag = uuid.uuid4().hex
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(home), MARKER: tag, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
                "RAY_USAGE_STATS_ENABLED": "0"})
    gcs, dash, client, agent = _free_ports(4)
    log = open(root / "head.log", "wb")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus", "4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={root / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while b"block forever" not in (root / "head.log").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{(root / 'head.log').read_bytes()[-3000:].decode(errors='replace')}")
            time.sleep(0.5)
        # `ray start` returns before the dashboard (the job API) listens: wait for its port, bounded
        if not _wait_for(lambda: _accepts(dash), timeout=60, interval=0.2):
            pytest.fail(f"the dashboard never listened on port {dash}")
        env["ELASTICTRAIN_TEST_GCS"] = f"127.0.0.1:{gcs}"  # where a plain driver (not a job) connects
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop(head, tag)
        log.close()
        leftovers = _marked_pids(tag)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster survived: {leftovers}"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cli(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    res.stdout, res.stderr = ANSI.sub("", res.stdout), ANSI.sub("", res.stderr)
    return res


def _submit(address: str, env: dict, job_id: str, script_args: list[str]) -> subprocess.Popen:
    """`ray job submit` as a CI step writes it; waits for the job and tails its logs."""
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
           "--runtime-env-json", '{"excludes": [".git", "bench-out", ".hypothesis"]}',
           "--", "python", *script_args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_job_submission_succeeds_and_a_broken_loop_fails_the_job(ray_head, tmp_path):
    address, env = ray_head
    uri = f"file://{tmp_path}/ckpt"

    # The job CLI sends the cluster's token only with RAY_AUTH_MODE=token (Ray 2.60): without it, refused.
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = _cli(["job", "list", "--address", address], bare)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()

    ok_id, bad_id = f"et-ok-{uuid.uuid4().hex[:8]}", f"et-bad-{uuid.uuid4().hex[:8]}"
    procs = {
        ok_id: _submit(address, env, ok_id, ["examples/minimal.py", "--steps", "15", "--checkpoint-uri", uri]),
        bad_id: _submit(address, env, bad_id, ["examples/minimal.py", "--steps", "15", "--fail-at", "3"]),
    }
    try:
        outputs = {job: p.communicate(timeout=100)[0] for job, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    status = {job: _cli(["job", "status", "--address", address, job], env) for job in procs}
    # `ray job status` prints SUCCEEDED / FAILED as "Job '<id>' succeeded / failed"
    assert f"Job '{ok_id}' succeeded" in status[ok_id].stdout, (status[ok_id].stdout, outputs[ok_id][-3000:])
    bad_status = status[bad_id].stdout
    assert f"Job '{bad_id}' failed" in bad_status, (bad_status, outputs[bad_id][-3000:])
    assert "exit code 1" in bad_status and "failed on purpose at step 3" in bad_status  # the reason, in the status

    ok_logs = _cli(["job", "logs", "--address", address, ok_id], env)
    assert ok_logs.returncode == 0 and "steps=15 " in ok_logs.stdout, ok_logs.stdout[-3000:]
    bad_logs = _cli(["job", "logs", "--address", address, bad_id], env)
    assert "training failed" in bad_logs.stdout and "failed on purpose at step 3" in bad_logs.stdout, bad_logs.stdout[-3000:]

    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig

    with CheckpointManager(CheckpointConfig(uri=uri)) as mgr:
        steps = [info.step for info in mgr.list()]
    assert 15 in steps, steps


def _newest_step(uri: str) -> int:
    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig

    with CheckpointManager(CheckpointConfig(uri=uri)) as mgr:
        return max((info.step for info in mgr.list()), default=-1)


def test_a_lost_driver_run_again_resumes_from_the_newest_checkpoint(ray_head, tmp_path):
    """The driver process is killed mid-run (its machine lost): its workers go with it (Ray ends a driver's
    actors with it). Run again, the same command resumes from the newest checkpoint and finishes."""
    _, env = ray_head
    uri = f"file://{tmp_path}/ckpt"
    driver_env = {**env, "RAY_ADDRESS": env["ELASTICTRAIN_TEST_GCS"], "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.integration.lost_driver", uri]
    first = subprocess.Popen(cmd, env=driver_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: _newest_step(uri) >= 10 or first.poll() is not None, timeout=180, interval=0.2)
        assert first.poll() is None, f"the run ended before its driver was lost:\n{first.communicate()[0][-3000:]}"
        first.send_signal(signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    # The killed driver's workers stop with it: no checkpoint is committed by them from here on.
    from elastictrain.testing.toy import ToyTask  # noqa: F401 - same task as the driver script

    newest = _newest_step(uri)
    assert 10 <= newest < 40, newest
    second = subprocess.run(cmd, env=driver_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    import json

    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 40 and summary["matches"], summary
    # It resumed from a checkpoint at least as new as the newest one written before the rerun started.
    assert summary["restored"] and summary["restored"][0] >= newest, summary
