"""What a real loop carries survives a follower's SIGKILL: BatchNorm statistics, an LR schedule, a
GradScaler and numpy / `random` draws end as in an uninterrupted run of the same world size (2)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import elastictrain as et
from elastictrain.testing.toy import ToyDataset, ToyTask
from tests.fault.faults import At, kill_follower
from tests.toy_runs import BATCH, FAILURE, kinds

TASK = ToyTask(total_steps=12)
KILL_AFTER = 5  # the driver kills a follower once step 5 committed; the first world waits for it at step 6


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(TASK.features, TASK.hidden), torch.nn.BatchNorm1d(TASK.hidden),
                               torch.nn.Tanh(), torch.nn.Linear(TASK.hidden, TASK.items))


def _train_fn(killed: Optional[Path]):
    def train_fn(ctx):
        np.random.seed(11)  # the loop seeds once per entry; ctx.state() brings the committed RNG states back
        random.seed(12)
        ds = ToyDataset(TASK)
        # Without the buffer broadcast, the survivor's lost step runs its forward pass (updating BatchNorm)
        # before any collective, so that step always leaves a buffer update to roll back.
        model = ctx.prepare_model(_net(), broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=TASK.total_steps)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        state = ctx.state(model=model, optimizer=opt, scheduler=sched, scaler=scaler, noise=np.float64(0.0))
        for step in ctx.steps(total_steps=TASK.total_steps):
            if killed is not None and ctx.term == 1 and step == KILL_AFTER + 1:
                deadline = time.monotonic() + 120
                while not killed.exists():  # the follower dies while this world waits here
                    if time.monotonic() > deadline:
                        raise TimeoutError("the driver did not kill a follower within 120 s")
                    time.sleep(0.02)
            state.noise = state.noise + np.random.rand() + random.random()
            with ctx.accumulate(model, opt, scaler=scaler) as acc:
                for x, y, mask in ctx.micro_batches(ds, step):
                    x = x + 0.01 * torch.randn_like(x)  # as augmentation would draw
                    total = (((model(x) - y) ** 2) * mask).sum()
                    acc.backward(total, num_items=mask.sum())
            sched.step()
            if step == TASK.total_steps - 1:
                plain = model.module if hasattr(model, "module") else model
                ctx.report({
                    "step": step, "params": torch.cat([p.detach().flatten() for p in plain.parameters()]).tolist(),
                    "buffers": {k: v.tolist() for k, v in plain.named_buffers()}, "lr": sched.get_last_lr(),
                    "scaler": scaler.state_dict(), "noise": float(state.noise), "noise_type": type(state.noise).__name__,
                })

    return train_fn


def _fit(killed: Optional[Path]) -> et.Result:
    def kill(view):
        kill_follower(view)
        killed.touch()

    callbacks = [At(KILL_AFTER, kill, min_members=2)] if killed is not None else []
    return et.ElasticTrainer(
        _train_fn(killed), scaling=et.ScalingConfig(min_workers=2, max_workers=2), batch=BATCH, failure=FAILURE,
        callbacks=callbacks,
    ).fit()


def _final(result: et.Result) -> dict:
    return [h for h in result.history if h.get("step") == TASK.total_steps - 1][-1]


def test_buffers_schedule_scaler_and_draws_survive_a_follower_kill(ray_session, tmp_path):
    clean = _final(_fit(None))
    faulty = _fit(tmp_path / "killed")
    assert "worker_lost" in kinds(faulty) and faulty.steps == TASK.total_steps
    assert "records_dropped" not in kinds(faulty)  # every record, the replacement's state reports included, was plain
    lost = [e for e in faulty.events if e["kind"] == "world_changed"]
    assert lost and all(e["step"] == KILL_AFTER + 1 for e in lost)  # the kill landed where it was placed
    last = _final(faulty)
    forwards = TASK.total_steps * BATCH.global_batch_size // BATCH.micro_batch_size // 2  # rank 0's micro-batches
    assert last["buffers"]["1.num_batches_tracked"] == clean["buffers"]["1.num_batches_tracked"] == forwards
    for name, value in clean["buffers"].items():
        torch.testing.assert_close(torch.tensor(last["buffers"][name]), torch.tensor(value), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(last["params"]), torch.tensor(clean["params"]), atol=1e-6, rtol=0)
    assert last["lr"] == clean["lr"] and last["scaler"] == clean["scaler"]
    assert last["noise_type"] == "float64" and abs(last["noise"] - clean["noise"]) < 1e-9
