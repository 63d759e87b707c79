"""`ctx.keep` on a real run: a survivor trains on through a follower's loss and a growth with the very
model and optimizer it built on its first entry (the same objects, the same parameter memory), its
factories not called again; a new member builds its own; the model matches the one-process reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import elastictrain as et
from elastictrain.testing.faults import hold_for_whole_world, hold_until_faults
from elastictrain.testing.toy import ToyDataset, ToyTask, flat_params, loss_sum, make_model
from tests.fault.faults import At, kill_follower
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process, kinds

TASK = ToyTask(total_steps=16, step_sleep_s=0.05)
FAULT_STEP = 6
GROW_STEP = 12  # the world of two survivors holds here until the replacement waits to join


def _train_fn(log_dir: str):
    hold_for_fault = hold_until_faults(FAULT_STEP + 1)
    hold_for_growth = hold_for_whole_world([GROW_STEP], workers=3)
    built: list[str] = []  # this worker process's factory calls, across its entries

    def build(name, factory):
        def counted():
            built.append(name)
            return factory()
        return counted

    def train_fn(ctx) -> None:
        dataset = ToyDataset(TASK)
        net = ctx.keep("net", build("net", lambda: make_model(TASK)))
        model = ctx.prepare_model(net)
        opt = ctx.keep("opt", build("opt", lambda: torch.optim.AdamW(net.parameters(), lr=TASK.lr)))
        state = ctx.state(model=model, optimizer=opt)
        entry = {"member": ctx.member_id, "term": ctx.term, "rank": ctx.rank, "step": state.step,
                 "net": id(net), "opt": id(opt), "ptr": next(net.parameters()).data_ptr(), "built": list(built)}
        with open(os.path.join(log_dir, f"entries-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        for step in ctx.steps(total_steps=TASK.total_steps):
            with ctx.accumulate(model, opt) as acc:
                for batch in ctx.micro_batches(dataset, step):
                    total, n = loss_sum(model, batch)
                    acc.backward(total, num_items=n)
            hold_for_fault(ctx, step)
            hold_for_growth(ctx, step)
            metrics = {"loss": acc.loss, "step": step}
            if state.step + 1 == TASK.total_steps:
                metrics["params"] = flat_params(model).tolist()
            ctx.report(metrics)

    return train_fn


def _entries(log_dir: Path) -> dict[str, list[dict]]:
    by_member: dict[str, list[dict]] = {}
    for path in sorted(log_dir.glob("entries-*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            by_member.setdefault(entry["member"], []).append(entry)
    return by_member


def test_survivors_keep_their_model_and_optimizer_objects_and_a_new_member_builds_its_own(ray_session, tmp_path):
    fault = At(FAULT_STEP, kill_follower, min_members=3)
    result = et.ElasticTrainer(
        _train_fn(str(tmp_path)), scaling=et.ScalingConfig(min_workers=2, max_workers=3), batch=BATCH,
        failure=FAILURE.model_copy(update={"startup_wait_s": 120.0}), callbacks=[fault],
    ).fit()
    assert fault.fired_at is not None and kinds(result).count("worker_lost") == 1
    lost = next(e["member"] for e in result.events if e["kind"] == "worker_lost")
    entries = _entries(tmp_path)
    survivors = {m: es for m, es in entries.items() if m != lost and es[0]["term"] == 1}
    newcomers = {m: es for m, es in entries.items() if es[0]["term"] > 1}
    assert len(survivors) == 2 and len(newcomers) == 1, entries
    for member, es in survivors.items():
        assert len(es) >= 3, f"{member} did not re-enter after the loss and the growth: {es}"
        first = es[0]
        for e in es[1:]:
            assert (e["net"], e["opt"], e["ptr"]) == (first["net"], first["opt"], first["ptr"]), (member, es)
            assert e["built"] == ["net", "opt"], f"a factory ran again on survivor {member}: {e['built']}"
        assert es[-1]["step"] > FAULT_STEP
    (member, es), = newcomers.items()
    assert es[0]["built"] == ["net", "opt"]  # a new member calls the factories and receives the state
    assert_matches_one_process(result, TASK)
