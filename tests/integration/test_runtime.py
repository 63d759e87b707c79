"""The runtime on a real local Ray cluster: plain runs, user errors, election on the GCS KV, preemption notices."""

from __future__ import annotations

import signal

import pytest
import torch

import elastictrain as et
from elastictrain.toy import ToyTask
from tests.fault.faults import At, a_follower
from tests.toy_runs import FAILURE, assert_matches_one_process, fit_toy


def _fit(task: ToyTask, *, workers=(2, 2), callbacks=()) -> et.Result:
    return fit_toy(task, workers=workers, callbacks=callbacks)


def test_uninterrupted_run_matches_one_process(ray_session):
    task = ToyTask(total_steps=12)
    result = _fit(task)
    assert result.steps == 12
    assert [h["step"] for h in result.history] == list(range(12))
    assert not [e for e in result.events if e["kind"] in ("worker_lost", "world_changed")]
    assert_matches_one_process(result, task)


def test_user_error_fails_the_run_with_its_reason(ray_session):
    def train_fn(ctx):
        model = ctx.prepare_model(torch.nn.Linear(2, 1))
        ctx.state(model=model)
        for step in ctx.steps(total_steps=10):
            if step == 3:
                raise ValueError("bad batch at step 3")

    with pytest.raises(et.TrainingFailed, match="ValueError: bad batch at step 3"):
        et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2), failure=FAILURE).fit()


def test_context_is_a_value_per_world(ray_session):
    def train_fn(ctx):
        assert et.get_context() is ctx
        state = ctx.state(model=ctx.prepare_model(torch.nn.Linear(2, 1)), tokens=0)
        for step in ctx.steps(total_steps=3):
            state.tokens += 5
            ctx.report({"rank": ctx.rank, "world_size": ctx.world_size, "generation": ctx.generation,
                        "is_leader": ctx.is_leader, "device": str(ctx.device), "tokens": state.tokens,
                        "ddp": isinstance(state.model, torch.nn.parallel.DistributedDataParallel)})

    result = et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2), failure=FAILURE).fit()
    m = result.metrics
    assert (m["rank"], m["world_size"], m["generation"], m["device"], m["tokens"], m["ddp"]) == (0, 2, 1, "cpu", 15, True)
    with pytest.raises(et.errors.NotInWorker):
        et.get_context()


def test_sigterm_notice_leaves_at_a_step_boundary_costing_no_step(ray_session):
    task = ToyTask(total_steps=30, step_sleep_s=0.05)
    notice = At(8, lambda view: view.signal(a_follower(view), signal.SIGTERM), min_members=3)
    result = _fit(task, workers=(2, 3), callbacks=[notice])
    kinds = [e["kind"] for e in result.events]
    assert notice.fired_at is not None
    assert "worker_left" in kinds and "preemption_notice" in kinds
    assert "worker_lost" not in kinds
    assert result.steps == 30 and result.steps_redone == 0
    assert_matches_one_process(result, task)


def test_ray_kv_one_leader_per_term_under_concurrent_candidates(ray_session):
    import uuid

    from elastictrain.election.election import Election
    from elastictrain.election.ray_store import RayKVStore

    namespace = f"election-test-{uuid.uuid4().hex}"

    @ray_session.remote(num_cpus=0)
    def candidate(i: int) -> list[int]:
        election = Election(RayKVStore(namespace))
        return [term for term in range(1, 31) if election.claim(term, f"m{i}")]

    won = ray_session.get([candidate.remote(i) for i in range(8)])
    terms = sorted(t for w in won for t in w)
    assert terms == list(range(1, 31))  # every term has exactly one leader
    election = Election(RayKVStore(namespace))
    assert election.newest_term() == 30
    assert not election.is_current(29)


def test_fit_releases_every_worker_it_started(ray_session):
    import time

    total = ray_session.cluster_resources()["CPU"]
    _fit(ToyTask(total_steps=3), workers=(2, 3))
    deadline = time.monotonic() + 20
    while ray_session.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU", 0) == total, "a finished run still holds worker resources"
