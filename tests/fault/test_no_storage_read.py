"""At most the in-flight step is lost, from memory: with a checkpoint URI configured and checkpoints on
disk, losing a follower reads nothing from storage (every read the workers' checkpoint code makes is
logged). Only when every replica dies does the run read its newest checkpoint."""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import elastictrain as et
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process, kinds

TASK = ToyTask(total_steps=20, step_sleep_s=0.05)
RESTORE_CALLS = ("latest", "load", "load_manifest")
HOLD_AT = 10


def _log_reads(log_path: str) -> None:
    """In this worker process: append a line to `log_path` for every read the checkpoint code makes."""
    from elastictrain.checkpoint.manager import CheckpointManager
    from elastictrain.checkpoint.storage import FsspecStorage

    if getattr(FsspecStorage, "_reads_logged_to", None) == log_path:
        return

    # Bookkeeping of the leader's saves, not restores: retention (on the save's threads and its io pool) reads
    # the manifests it keeps; a leader's first save opens the run (run.json, the manifests' run id and keys).
    busy: dict[str, int] = {"retention": 0, "open_run": 0}

    def write(op: str, name: str) -> None:
        during = next((what for what, depth in busy.items() if depth), None)
        line = json.dumps({"time": time.time(), "pid": os.getpid(), "op": op, "name": name, "during": during})
        with open(log_path, "a") as f:
            f.write(line + "\n")

    def logged(cls, method: str, name_of) -> None:
        original = getattr(cls, method)

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            write(method, name_of(args))
            return original(self, *args, **kwargs)

        setattr(cls, method, wrapper)

    for method in ("get", "view", "list"):  # every path by which FsspecStorage reads (list: manifest names)
        logged(FsspecStorage, method, lambda args: str(args[0]) if args else "")
    for method in RESTORE_CALLS:
        logged(CheckpointManager, method, lambda args: str(args[0]) if args and not isinstance(args[0], dict) else "")
    def marked(method: str, what: str) -> None:
        original = getattr(CheckpointManager, method)

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            busy[what] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                busy[what] -= 1

        setattr(CheckpointManager, method, wrapper)

    marked("_apply_retention", "retention")
    marked("_open_run", "open_run")
    FsspecStorage._reads_logged_to = log_path


def _train_fn(log_path: str):
    inner = make_train_fn(TASK, on_step=hold_until_faults(HOLD_AT))  # the fault lands mid-run on any machine

    def train_fn(ctx):
        _log_reads(log_path)
        inner(ctx)

    return train_fn


def _reads(log_path) -> list[dict]:
    with open(log_path) as f:
        return [json.loads(line) for line in f]


class WhenCheckpointed:
    """Once a checkpoint is on disk and `min_members` are in the world, run `action(view)`, once."""

    def __init__(self, ckpt_dir, action, min_members: int) -> None:
        self.manifests = os.path.join(ckpt_dir, "manifests")
        self.action, self.min_members = action, min_members
        self.fired_at = None

    def on_progress(self, view) -> None:
        if self.fired_at is not None or len(view.members()) < self.min_members:
            return
        if os.path.isdir(self.manifests) and any(n.endswith(".json") for n in os.listdir(self.manifests)):
            self.fired_at = time.time()
            self.action(view)


def kill_a_follower(view) -> None:
    view.signal(sorted(m for m, info in view.members().items() if not info["leader"])[0], signal.SIGKILL)


def kill_everyone(view) -> None:
    for member in view.members():
        view.signal(member, signal.SIGKILL)


def _fit(tmp_path, action, min_members: int):
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "reads.jsonl"
    log.touch()
    fault = WhenCheckpointed(str(ckpt), action, min_members)
    result = et.ElasticTrainer(
        _train_fn(str(log)),
        scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH,
        checkpoint=et.CheckpointConfig(uri=f"file://{ckpt}", every_steps=2),
        failure=FAILURE.model_copy(update={"startup_wait_s": 120.0}),  # the first world has all three
        callbacks=[fault],
    ).fit()
    assert fault.fired_at is not None, "the fault never fired"
    assert "checkpoint" in kinds(result)
    return result, fault.fired_at, _reads(log)


def test_losing_a_follower_reads_nothing_from_storage(ray_session, tmp_path):
    result, lost_at, reads = _fit(tmp_path, kill_a_follower, min_members=3)
    assert kinds(result).count("worker_lost") == 1
    assert any(r["op"] == "latest" for r in reads if r["time"] < lost_at), "the read log is not live in the workers"
    # The leader's saves go on after the loss, and each one's retention reads the manifests it keeps
    # (to know which chunks they share): a save's bookkeeping, not a restore. Anything else is one.
    after = [r for r in reads if r["time"] >= lost_at and r["op"] != "list" and r["during"] is None]
    assert not after, f"storage read while a replica survived: {after}"
    assert not [r for r in reads if r["time"] >= lost_at and r["name"].startswith("chunks/")]
    assert "restored_from_checkpoint" not in kinds(result)
    assert_matches_one_process(result, TASK)


def test_losing_every_replica_restores_from_storage(ray_session, tmp_path):
    result, lost_at, reads = _fit(tmp_path, kill_everyone, min_members=3)
    after = [r for r in reads if r["time"] >= lost_at]
    assert any(r["op"] == "latest" for r in after), after
    assert any(r["op"] == "get" and r["name"].startswith("manifests/") for r in after), after
    assert any(r["op"] in ("get", "view") and r["name"].startswith("chunks/") for r in after), after
    assert "restored_from_checkpoint" in kinds(result)
    assert_matches_one_process(result, TASK)
