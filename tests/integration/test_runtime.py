"""The runtime on a real local Ray cluster: plain runs, user errors, election on the GCS KV, preemption notices."""

from __future__ import annotations

import re
import signal

import pytest
import torch

import elastictrain as et
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask
from tests.fault.faults import At, a_follower
from tests.toy_runs import FAILURE, assert_matches_one_process, fit_toy


def _fit(task: ToyTask, *, workers=(2, 2), callbacks=()) -> et.Result:
    return fit_toy(task, workers=workers, callbacks=callbacks)


def test_uninterrupted_run_matches_one_process(ray_session):
    task = ToyTask(total_steps=12)
    result = _fit(task)
    assert result.steps == 12
    assert [h["step"] for h in result.history] == list(range(12))
    assert not [e for e in result.events if e["kind"] in ("worker_lost", "world_changed", "records_dropped")]
    assert_matches_one_process(result, task)


@pytest.mark.parametrize("error", [ValueError("bad batch at step 3"),
                                   RuntimeError("DataLoader timed out after 30 seconds (socket closed)")])
def test_user_error_fails_the_run_with_its_reason(ray_session, error):
    def train_fn(ctx):
        model = ctx.prepare_model(torch.nn.Linear(2, 1))
        ctx.state(model=model)
        for step in ctx.steps(total_steps=10):
            if step == 3:
                raise error  # words a lost peer would use, raised by the user's code: still the user's error

    with pytest.raises(et.TrainingFailed, match=re.escape(f"{type(error).__name__}: {error}")) as failed:
        et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2), failure=FAILURE).fit()
    assert "rebuilds without a committed step" not in str(failed.value)
    assert failed.value.reason.endswith(f"{type(error).__name__}: {error}")
    assert "test_runtime.py" in failed.value.cause and "raise error" in failed.value.cause  # the worker's traceback


def test_context_is_a_value_per_world(ray_session):
    def train_fn(ctx):
        assert et.get_context() is ctx
        state = ctx.state(model=ctx.prepare_model(torch.nn.Linear(2, 1)), tokens=0)
        # no node carries a "region" label: every rank is in "region:", and rank 0 leads it
        in_region = torch.ones(1)
        torch.distributed.all_reduce(in_region, group=ctx.group("region:"))
        try:
            leaders = ctx.group("leaders:region")
        except KeyError:
            leaders = None
        for step in ctx.steps(total_steps=3):
            state.tokens += 5
            ctx.report({"rank": ctx.rank, "world_size": ctx.world_size, "generation": ctx.term,
                        "is_leader": ctx.is_leader, "device": str(ctx.device), "tokens": state.tokens,
                        "ddp": isinstance(state.model, torch.nn.parallel.DistributedDataParallel),
                        "ddp_group_is_world": getattr(state.model, "process_group", None) is ctx.group(),
                        "in_region": in_region.item(), "leads_region": leaders is not None,
                        "groups": sorted(ctx.topology.groups)})

    class Namespace:
        name = None

        def on_progress(self, view):
            Namespace.name = view._driver.spec.namespace

    result = et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2, group_by=["region"]),
                               failure=FAILURE, callbacks=[Namespace()]).fit()
    from ray.experimental import internal_kv

    assert Namespace.name and internal_kv._internal_kv_list(b"", namespace=Namespace.name) == []  # nothing left behind
    m = result.metrics
    assert (m["rank"], m["world_size"], m["generation"], m["device"], m["tokens"], m["ddp"]) == (0, 2, 1, "cpu", 15, True)
    assert m["ddp_group_is_world"] and m["in_region"] == 2.0 and m["leads_region"]
    assert m["groups"] == ["leaders:region", "region:", "world"]
    assert [h["step"] for h in result.history] == [0, 1, 2]  # stamped with the step being run
    with pytest.raises(et.errors.NotInWorker):
        et.get_context()


def test_sigterm_notice_leaves_at_a_step_boundary_costing_no_step(ray_session):
    from tests.fault.test_give_up import wait_until_released

    total = ray_session.cluster_resources()["CPU"]
    task = ToyTask(total_steps=16, step_sleep_s=0.05)
    notice = At(8, lambda view: view.signal(a_follower(view), signal.SIGTERM), min_members=3)
    result = fit_toy(task, workers=(2, 3), callbacks=[notice], hold_at=9)
    kinds = [e["kind"] for e in result.events]
    assert notice.fired_at is not None
    assert "worker_left" in kinds and "preemption_notice" in kinds
    assert "worker_lost" not in kinds
    assert result.steps == task.total_steps and result.steps_redone == 0
    assert_matches_one_process(result, task)
    # fit releases every worker it started: those that finished, the one that left and its replacement
    assert "worker_started" in kinds[kinds.index("worker_left"):]
    assert wait_until_released(ray_session, total, 20) == total, "a finished run still holds worker resources"


def test_ray_kv_one_leader_per_term_under_concurrent_candidates(ray_session):
    import uuid

    from elastictrain.election.election import Election
    from elastictrain.election.ray_store import RayKVStore

    from elastictrain.secret import RunSecret

    namespace = f"election-test-{uuid.uuid4().hex}"
    secret = RunSecret.generate()  # one run: every candidate holds its secret

    @ray_session.remote(num_cpus=0)
    def candidate(i: int) -> list[int]:
        election = Election(RayKVStore(namespace), secret, scope=namespace)
        return [term for term in range(1, 31) if election.claim(term, f"m{i}")]

    won = ray_session.get([candidate.remote(i) for i in range(4)])
    terms = sorted(t for w in won for t in w)
    assert terms == list(range(1, 31))  # every term has exactly one leader
    election = Election(RayKVStore(namespace), secret, scope=namespace)
    assert election.newest_term() == 30
    assert not election.is_current(29)


def _count_all_reduces_per_step(ctx, use_accumulate: bool) -> list[int]:
    """Steps of a tiny model, counting Python-level all-reduces (DDP's bucket reduce runs in C++)."""
    import torch.distributed as dist

    counts, original = [0], dist.all_reduce

    def counting(*args, **kwargs):
        counts[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        model = ctx.prepare_model(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx.state(model=model, optimizer=opt)
        per_step, seen = [], 0
        for step in ctx.steps(total_steps=6):
            x = torch.ones(3, 4) * (ctx.rank + 1)
            if use_accumulate:
                with ctx.accumulate(model, opt) as acc:
                    acc.backward(model(x).sum(), num_items=3)
            else:
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
            # From the end of one step to the end of the next: the boundary vote is counted too.
            per_step.append(counts[0] - seen)
            seen = counts[0]
        return per_step
    finally:
        dist.all_reduce = original


def test_boundary_vote_rides_on_the_accumulator_all_reduce(ray_session):
    def train_fn(ctx):
        with_acc = _count_all_reduces_per_step(ctx, use_accumulate=True)
        ctx.report({"per_step": with_acc})

    result = et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2),
                               batch=et.BatchConfig(global_batch_size=2, micro_batch_size=1), failure=FAILURE).fit()
    # Each step: the item-count all-reduce, which also carries the vote, and nothing else.
    # (The vote before the first step has nothing to ride on; the count is taken after it.)
    assert result.metrics["per_step"][1:] == [1] * 5, result.metrics["per_step"]


def test_plain_loop_without_accumulate_still_votes_and_leaves_cleanly(ray_session):
    def train_fn(ctx):
        import time as _time

        model = ctx.prepare_model(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        state = ctx.state(model=model, optimizer=opt)
        hold = hold_until_faults(9)
        for step in ctx.steps(total_steps=20):
            hold(ctx, step)
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            _time.sleep(0.05)
            ctx.report({"step": step, "w": float(state.model.module.weight.sum()) if ctx.world_size > 1 else 0.0})

    notice = At(8, lambda view: view.signal(a_follower(view), signal.SIGTERM), min_members=3)
    result = et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=3),
                               failure=FAILURE.model_copy(update={"startup_wait_s": 120.0}), callbacks=[notice]).fit()
    kinds = [e["kind"] for e in result.events]
    assert "worker_left" in kinds and "worker_lost" not in kinds
    assert result.steps == 20 and result.steps_redone == 0


def test_a_state_a_rank_refuses_fails_the_run_on_every_rank_with_the_mismatch(ray_session):
    def train_fn(ctx):
        # rank 0's model differs from the others': whichever way its state goes, a receiver refuses it
        model = ctx.prepare_model(torch.nn.Linear(3, 2 if ctx.rank == 0 else 4))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        state = ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=5):
            state.step = step

    with pytest.raises(et.TrainingFailed) as failed:  # a fresh world syncs rank 0's initialisation to every rank
        et.ElasticTrainer(train_fn, scaling=et.ScalingConfig(min_workers=2, max_workers=2),
                          batch=et.BatchConfig(global_batch_size=4, micro_batch_size=2), failure=FAILURE).fit()
    reason = failed.value.reason
    # the first rank to end the run names it: the receiver with the mismatch, or rank 0 naming the receiver
    assert "StateRefused" in reason, reason
    assert "the models differ" in reason or "rank 1 refused the state rank 0 broadcast" in reason, reason
    assert "rebuilds without a committed step" not in failed.value.reason
