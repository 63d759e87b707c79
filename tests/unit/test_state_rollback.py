"""A survivor's in-memory restore after a step lost before its optimizer step: buffers, LR scheduler,
GradScaler, optimizer hyperparameters, EMA, plain entries and every RNG are those of the last commit,
and the step run again computes what an uninterrupted run computes. One worker, no Ray."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import WorldPlan
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState
from elastictrain.runtime.world import WorldInfo


def _runner() -> Runner:
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(), batch=BatchConfig(global_batch_size=8),
                   checkpoint=CheckpointConfig(), failure=FailureConfig(), run=RunConfig())
    return Runner("m0", lambda ctx: None, spec, Election(MemoryStore()), lambda records: None, {}, torch.device("cpu"))


def _world(term: int, step: int) -> WorldInfo:
    plan = WorldPlan(term=term, leader="m0", members=("m0",), steps=(step,), host="h", port=1)
    return WorldInfo.from_plan(plan, "m0")


def _entry(seed_model: int = 0) -> ElasticState:
    """What train_fn builds on each entry: new objects, registered in ctx.state()."""
    torch.manual_seed(seed_model)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    return ElasticState({"model": model, "opt": opt, "sched": sched, "scaler": scaler, "ema": ema,
                         "draws": [], "tokens": np.int64(0)})


def _step(state: ElasticState, x: torch.Tensor, *, lose: str = "") -> None:
    """One training step; `lose` stops it where a peer's loss would: after the forward pass, or after a
    GradScaler skipped the optimizer step (found inf) and the loop stepped the scheduler anyway. (EMA
    weights, not copied at commits, must not be updated before a failure in a step the scaler skipped.)"""
    state.draws.append((float(torch.rand(())), float(np.random.rand()), random.random()))
    state.tokens = state.tokens + np.int64(x.shape[0])
    loss = state.model(x).square().mean()
    if lose == "after_forward":
        return
    if lose == "after_skipped_step":
        loss = loss * float("inf")
    state.scaler.scale(loss).backward()
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad()
    state.sched.step()
    if lose:  # here the loop's post-step collective (a logged metric) fails
        return
    state.ema.update_parameters(state.model)


def _snapshot(state: ElasticState) -> dict:
    """Everything the run carries, copied."""
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in state.ema.state_dict().items()},
        "sched": dict(state.sched.state_dict()), "scaler": state.scaler.state_dict(),
        "lr": [g["lr"] for g in state.opt.param_groups], "draws": list(state.draws), "tokens": state.tokens,
    }


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    assert a["sched"] == b["sched"] and a["scaler"] == b["scaler"] and a["lr"] == b["lr"]
    assert a["draws"] == b["draws"] and a["tokens"] == b["tokens"] and type(a["tokens"]) is type(b["tokens"])


def _run(lose_at: int, how: str, steps: int = 6) -> dict:
    """`steps` steps; at step `lose_at` the first attempt is lost (`how`), the world is rebuilt and the
    step runs again in new objects, restored from the survivor's memory."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    data = [torch.randn(5, 3, 8, 8) for _ in range(steps)]
    runner = _runner()
    state = _entry()
    runner.restore(state, _world(1, -1))
    step = 0
    while step < steps:
        if step == lose_at and how:
            _step(state, data[step], lose=how)
            runner._live.release_world()
            how = ""
            state = _entry(seed_model=99)  # new objects, other initial weights: all must come from the restore
            runner.restore(state, _world(2, step))
            assert state.step == step
            continue
        _step(state, data[step])
        state.step = step = step + 1
        runner.on_commit(state, _world(1, step), step - 1)
    return _snapshot(state)


def test_a_step_lost_after_its_forward_pass_leaves_no_buffer_update_behind():
    clean = _run(-1, "")
    assert clean["model"]["1.num_batches_tracked"] == 6  # BatchNorm counted each step once
    _assert_same(_run(3, "after_forward"), clean)


def test_a_step_lost_after_a_skipped_scaler_step_leaves_no_scale_or_lr_change_behind():
    clean = _run(-1, "")
    _assert_same(_run(2, "after_skipped_step"), clean)



def test_a_commit_copies_rng_states_raw_and_converts_them_only_when_laid_over(monkeypatch):
    from elastictrain.runtime import rollback
    from elastictrain.runtime.rng import rng_state, set_rng_state

    converted = []
    real = rollback.rng_state_of
    monkeypatch.setattr(rollback, "rng_state_of", lambda captured: converted.append(1) or real(captured))
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = rng_state()
    copy = rollback.CommitCopy()
    for _ in range(3):  # a commit per step: nothing converted
        copy.take({}, {})
    assert converted == []
    draws = (float(torch.rand(())), random.random(), float(np.random.rand()))
    tree = copy.lay_over({"objects": {}})
    assert converted == [1]
    for key in ("torch", "numpy", "random"):
        assert key in tree["rng"]
    assert torch.equal(tree["rng"]["torch"], expected["torch"])
    assert torch.equal(tree["rng"]["numpy"]["keys"], expected["numpy"]["keys"])
    assert torch.equal(tree["rng"]["random"]["state"], expected["random"]["state"])
    set_rng_state(tree["rng"])
    assert (float(torch.rand(())), random.random(), float(np.random.rand())) == draws
