"""What a worker reported before it died reaches the Result: its last reports and its checkpoint commits."""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch

import elastictrain as et
from elastictrain.checkpoint import CheckpointManager
from elastictrain.testing.toy import ToyDataset, ToyTask, flat_params, loss_sum, make_model
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process

TASK = ToyTask(total_steps=12)


def _cut_off(runner) -> None:
    """From now on nothing this worker queues reaches the driver (records stay queued, as on a dead link)."""

    def refuse(records):
        raise ConnectionError("cut off")

    runner._send = refuse


def _train_fn(rank0_dies_after_last_report: bool = False, leader_dies_after_save_at: Optional[int] = None):
    def train_fn(ctx):
        ds = ToyDataset(TASK)
        model = ctx.prepare_model(make_model(TASK))
        opt = torch.optim.AdamW(model.parameters(), lr=TASK.lr)
        ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=TASK.total_steps):
            dying_leader = leader_dies_after_save_at is not None and ctx.term == 1 and ctx.is_leader
            if dying_leader and step == leader_dies_after_save_at + 1:
                manager = ctx._session.runner._checkpoints
                manager.wait()  # the save of the step before has committed: its manifest is written
                os.kill(os.getpid(), signal.SIGKILL)
            with ctx.accumulate(model, opt) as acc:
                for b in ctx.micro_batches(ds, step):
                    total, n = loss_sum(model, b)
                    acc.backward(total, num_items=n)
            metrics = {"step": step, "loss": acc.loss}
            last = step == TASK.total_steps - 1
            if last:
                metrics["params"] = flat_params(model).tolist()
            if last and rank0_dies_after_last_report and ctx.term == 1 and ctx.rank == 0:
                _cut_off(ctx._session.runner)
                ctx.report(metrics)
                os.kill(os.getpid(), signal.SIGKILL)
            ctx.report(metrics)

    return train_fn


def test_the_last_reports_of_a_rank_0_killed_before_sending_them_reach_the_result(ray_session):
    result = et.ElasticTrainer(
        _train_fn(rank0_dies_after_last_report=True), scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH, failure=FAILURE,
    ).fit()
    assert [e["kind"] for e in result.events].count("worker_lost") == 1
    assert [h["step"] for h in result.history] == list(range(TASK.total_steps))  # none missing, none twice
    assert result.metrics["step"] == TASK.total_steps - 1 and "params" in result.metrics
    assert_matches_one_process(result, TASK)


def test_a_checkpoint_a_killed_leader_committed_has_its_event(ray_session, tmp_path):
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=4)
    result = et.ElasticTrainer(
        _train_fn(leader_dies_after_save_at=4), scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH, failure=FAILURE, checkpoint=ckpt,
    ).fit()
    lost = [e["member"] for e in result.events if e["kind"] == "worker_lost"]
    assert len(lost) == 1
    by_dead_leader = [e["step"] for e in result.events if e["kind"] == "checkpoint" and e["member"] == lost[0]]
    assert by_dead_leader == [4]
    # every checkpoint in storage has its event (ckpt ls and the Result agree)
    stored = {(c.step, c.term) for c in CheckpointManager(ckpt).list()}
    assert stored and stored <= {(e["step"], e["term"]) for e in result.events if e["kind"] == "checkpoint"}
