"""A member dies inside a step: before the optimizer stepped (the step is run again, leaving no counter
or random draw behind) or after it (the step counts as done, not applied twice)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

import elastictrain as et
from elastictrain.testing.toy import ToyDataset, ToyTask, flat_params, loss_sum, model_and_optimizer
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process, kinds

TASK = ToyTask(total_steps=16)
DIE_AT = 8


def _train_fn(die: str, keep: bool = False):
    def train_fn(ctx):
        ds = ToyDataset(TASK)
        # kept: the survivors' objects are the live ones, and the lost attempt is undone on them in place
        model, opt = model_and_optimizer(ctx, TASK, keep)
        state = ctx.state(model=model, optimizer=opt, tokens=0, seen=[])
        for step in ctx.steps(total_steps=TASK.total_steps):
            state.tokens += 1
            state.seen.append(step)
            noise = float(torch.rand(()))  # as dropout or augmentation would draw
            dying = die and ctx.term == 1 and ctx.rank == 1 and step == DIE_AT
            if dying and die == "before_optimizer":
                os.kill(os.getpid(), signal.SIGKILL)
            with ctx.accumulate(model, opt) as acc:
                for b in ctx.micro_batches(ds, step):
                    total, n = loss_sum(model, b)
                    acc.backward(total, num_items=n)
            if dying and die == "after_optimizer":
                os.kill(os.getpid(), signal.SIGKILL)
            if ctx.world_size > 1:  # a metric all-reduced for logging, after the optimizer step
                dist.all_reduce(torch.tensor([acc.loss]))
            metrics = {"step": step, "tokens": state.tokens, "seen": len(state.seen), "noise": noise}
            if step == TASK.total_steps - 1:
                metrics["params"] = flat_params(model).tolist()
            ctx.report(metrics)

    return train_fn


def _fit(die: str, keep: bool = False) -> et.Result:
    return et.ElasticTrainer(
        _train_fn(die, keep), scaling=et.ScalingConfig(min_workers=2, max_workers=3), batch=BATCH, failure=FAILURE,
        run=et.RunConfig(seed=3),
    ).fit()


@pytest.fixture(scope="module")
def clean_draws(ray_session) -> dict:
    """The per-step random draws of an uninterrupted run: one run for every test that compares with it."""
    return {h["step"]: h["noise"] for h in _fit("").history}


def test_death_after_the_optimizer_step_keeps_the_step_instead_of_applying_it_twice(ray_session):
    """Runs the older loop form (the README's before `ctx.keep`: each entry builds a new model and optimizer,
    loaded from the survivor's), so this is also its check that a follower's SIGKILL is survived."""
    result = _fit("after_optimizer")
    assert kinds(result).count("worker_lost") == 1
    assert {e["step"] for e in result.events if e["kind"] == "in_flight_step_kept"} == {DIE_AT}  # each survivor
    assert_matches_one_process(result, TASK)
    assert result.steps_redone == 0


@pytest.mark.parametrize("keep", [False, True], ids=["objects_built_per_entry", "objects_kept"])
def test_death_before_the_optimizer_step_leaves_no_counter_or_draw_behind(ray_session, clean_draws, keep):
    faulty = _fit("before_optimizer", keep)
    assert "worker_lost" in kinds(faulty) and "in_flight_step_kept" not in kinds(faulty)
    assert_matches_one_process(faulty, TASK)
    last = faulty.history[-1]
    assert last["tokens"] == last["seen"] == TASK.total_steps  # the lost attempt's += 1 and append are undone
    assert {h["step"]: h["noise"] for h in faulty.history} == clean_draws  # the redone step draws the same numbers
