"""Checkpoints driven by the runtime: autoresume, fallback when every replica dies, saves on notice."""

from __future__ import annotations

import base64
import os
import signal

import pytest
import torch

import elastictrain as et
from elastictrain.checkpoint import CheckpointManager
from elastictrain.testing.toy import ToyTask
from tests.fault.faults import At, a_follower
from tests.toy_runs import FAILURE, assert_matches_one_process, fit_toy


@pytest.fixture
def key_spec(tmp_path):
    path = tmp_path / "run.key"
    path.write_text(base64.b64encode(bytes(range(32))).decode())
    return f"file:{path}"


def _fit(task, ckpt, *, workers=(2, 2), callbacks=(), hold_at=None):
    return fit_toy(task, workers=workers, callbacks=callbacks, checkpoint=ckpt, hold_at=hold_at)


def _assert_reference(result, task):
    assert_matches_one_process(result, task)


def test_resubmitted_job_resumes_from_its_encrypted_checkpoint_and_says_so_when_the_newest_were_deleted(
        ray_session, tmp_path, key_spec):
    import uuid

    from elastictrain.checkpoint.storage import FsspecStorage
    from elastictrain.testing.toy import make_train_fn
    from tests.toy_runs import BATCH

    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=4,
                               encryption=et.EncryptionConfig(key=key_spec))
    run = et.RunConfig(name=f"resubmit-{uuid.uuid4().hex[:8]}")

    def fit(task):
        return et.ElasticTrainer(
            make_train_fn(task), scaling=et.ScalingConfig(min_workers=2, max_workers=2), batch=BATCH,
            checkpoint=ckpt, failure=FAILURE, run=run,
        ).fit()

    def rollbacks(result):
        return [(e["recorded_step"], e["found_step"]) for e in result.events if e["kind"] == "checkpoint_rollback"]

    first = fit(ToyTask(total_steps=10))
    assert first.steps == 10 and first.checkpoint_uri == ckpt.uri
    task = ToyTask(total_steps=16)
    second = fit(task)
    assert second.history[0]["step"] == 10  # continued, did not start over
    assert any(e["kind"] == "restored_from_checkpoint" and e["step"] == 10 for e in second.events)
    _assert_reference(second, task)
    saved = CheckpointManager(ckpt).list()  # a periodic save may be deferred a step behind one in flight
    assert saved[-1].step == 16 and len(saved) >= 2 and all(c.encrypted for c in saved)
    assert rollbacks(first) == rollbacks(second) == []

    # the storage provider deletes the newest checkpoints between two fit() calls of the same run name:
    # the next one resumes from what is left, and its events name the recorded and the found step
    FsspecStorage(ckpt.uri).delete([c.name for c in saved[1:]])
    third = fit(ToyTask(total_steps=18))
    assert third.history[0]["step"] == saved[0].step
    assert rollbacks(third) == [(16, saved[0].step)]


def test_every_replica_lost_falls_back_to_the_newest_checkpoint(ray_session, tmp_path):
    task = ToyTask(total_steps=16, step_sleep_s=0.05)
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=4)

    def kill_everyone(view):
        for member in list(view.members()):
            view.signal(member, signal.SIGKILL)

    fault = At(10, kill_everyone, min_members=2)
    result = _fit(task, ckpt, callbacks=[fault], hold_at=11)
    restored = [e for e in result.events if e["kind"] == "restored_from_checkpoint"]
    assert fault.fired_at is not None and restored
    assert restored[-1]["step"] % 4 == 0 and restored[-1]["step"] >= 8
    assert result.steps == task.total_steps and result.steps_redone <= 4  # at most the steps since the last save
    _assert_reference(result, task)


def test_preemption_notice_saves_before_leaving(ray_session, tmp_path):
    task = ToyTask(total_steps=16, step_sleep_s=0.05)
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=1000)
    notice = At(7, lambda view: view.signal(a_follower(view), signal.SIGTERM), min_members=3)
    result = _fit(task, ckpt, workers=(2, 3), callbacks=[notice], hold_at=8)
    saved = sorted(c.step for c in CheckpointManager(ckpt).list())
    notice_event = next(e for e in result.events if e["kind"] == "preemption_notice")
    left_at = notice_event["step"]
    left = next(e for e in result.events if e["kind"] == "left")
    assert notice_event["source"] == left["source"] == "sigterm" and left["notice_s"] is None
    assert left["used_s"] > 0
    assert left_at in saved and saved[-1] == task.total_steps
    # the run has one writer: every save comes from the leader of its term, never from the member leaving
    leaders = {(e["term"], e["leader"]) for e in result.events if e["kind"] == "world"}
    saves = [(e["term"], e["member"]) for e in result.events if e["kind"] == "checkpoint"]
    assert saves and all(s in leaders for s in saves)
    assert (notice_event["term"], notice_event["member"]) not in saves
    assert result.steps_redone == 0
    _assert_reference(result, task)


FINAL = 12


def _slow_final_save_fn(save_s: float, stall_first: str = ""):
    """A loop whose final save takes `save_s`; with `stall_first` (a path), the first member to start the
    final save stalls in it (bounded) until it is killed, and marks the path so later leaders save at once."""

    def train_fn(ctx):
        import os as _os
        import time as _time

        from elastictrain.checkpoint import manager as manager_module

        real = manager_module.CheckpointManager._save_now

        def slow(self, tensors, skeleton, step, term, reuse, **kwargs):
            if step == FINAL:
                if stall_first and not _os.path.exists(stall_first):
                    open(stall_first, "w").close()
                    _time.sleep(60)  # stalled in storage: the test kills this leader on final_save_started
                else:
                    _time.sleep(save_s)  # a large model on remote storage
            return real(self, tensors, skeleton, step, term, reuse, **kwargs)

        manager_module.CheckpointManager._save_now = slow
        model = ctx.prepare_model(torch.nn.Linear(2, 1))
        ctx.state(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        for _ in ctx.steps(total_steps=FINAL):
            _time.sleep(0.05)

    return train_fn


def _final_run(tmp_path, save_s, failure, callbacks=(), stall_first=""):
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=100)
    result = et.ElasticTrainer(_slow_final_save_fn(save_s, stall_first), scaling=et.ScalingConfig(min_workers=2, max_workers=3),
                               failure=failure, checkpoint=ckpt, callbacks=list(callbacks)).fit()
    return result, [c.step for c in CheckpointManager(ckpt).list()]


def test_a_final_save_slower_than_the_rendezvous_timeout_still_commits(ray_session, tmp_path):
    failure = et.FailureConfig(collective_timeout_s=4, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5,
                               rendezvous_timeout_s=1.0)
    result, steps = _final_run(tmp_path, 4.0, failure)
    assert steps == [FINAL] and result.steps == FINAL
    assert "stragglers_killed" not in [e["kind"] for e in result.events]
    assert [e["step"] for e in result.events if e["kind"] == "checkpoint"] == [FINAL]  # emitted on commit


def test_leader_lost_during_the_final_save_a_new_leader_writes_it(ray_session, tmp_path):
    class KillLeaderWhileSaving:
        """Kills the member that announced its final save, once the whole world is there."""

        def __init__(self):
            self.killed = None

        def on_progress(self, view):
            pass

        def on_event(self, view, event):
            if self.killed is None and event["kind"] == "final_save_started":
                self.killed = event["member"]
                view.signal(event["member"], signal.SIGKILL)

    kill = KillLeaderWhileSaving()
    stalled = str(tmp_path / "stalled")
    result, steps = _final_run(tmp_path, 0.0, FAILURE, [kill], stall_first=stalled)
    assert kill.killed is not None and os.path.exists(stalled)  # the kill landed inside the stalled final save
    assert steps == [FINAL] and result.steps == FINAL
    saves = [(e["term"], e["member"]) for e in result.events if e["kind"] == "checkpoint"]
    leaders = {(e["term"], e["leader"]) for e in result.events if e["kind"] == "world"}
    assert len(saves) == 1 and saves[0] in leaders and saves[0][0] > 1  # one writer, the new term's leader
    assert saves[0][1] != kill.killed
    assert [e["member"] for e in result.events if e["kind"] == "worker_lost"] == [kill.killed]
