"""A stream-fed run with DataLoader workers, through a worker kill and a restart from a checkpoint: every
step trains on exactly its window of the stream, each sample once, and ends with an uninterrupted run's model."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Optional

import torch

import elastictrain as et
from elastictrain.accumulate import plan_rank
from elastictrain.testing.toy import ToyDataset, ToyTask, flat_params, loss_sum, make_model
from tests.fault.faults import At, kill_follower
from tests.toy_runs import BATCH, FAILURE, kinds

TASK = ToyTask()
G = BATCH.global_batch_size
SHARD = 40
FIRST_STEPS, TOTAL_STEPS = 10, 16
GATE_STEP = 6  # the first run's ranks wait here until the kill has landed: the fault is placed by an event


def _stream_order() -> list[int]:
    return torch.randperm(TASK.samples, generator=torch.Generator().manual_seed(11)).tolist()


def _make_train_fn(log_dir: Path, total_steps: int, gate: Optional[Path]):
    def train_fn(ctx) -> None:
        data, order = ToyDataset(TASK), _stream_order()
        stream = et.ShardStream(
            lambda: ([(i, *data[i]) for i in order[lo:lo + SHARD]] for lo in range(0, len(order), SHARD)),
            lengths=[len(order[lo:lo + SHARD]) for lo in range(0, len(order), SHARD)],
        )
        children_at_entry = [p.pid for p in multiprocessing.active_children()]  # the last entry's workers: none
        model = ctx.prepare_model(make_model(TASK))
        opt = torch.optim.AdamW(model.parameters(), lr=TASK.lr)
        state = ctx.state(model=model, optimizer=opt)
        with open(log_dir / f"{os.getpid()}.jsonl", "a") as log:
            for step in ctx.steps(total_steps=total_steps):
                if gate is not None and step == GATE_STEP:
                    _wait_for_file(gate)
                ids = []
                with ctx.accumulate(model, opt) as acc:
                    for ids_batch, x, y, mask in ctx.micro_batches(stream, step, num_workers=2):
                        ids += ids_batch.tolist()
                        total, n = loss_sum(model, (x, y, mask))
                        acc.backward(total, num_items=n)
                log.write(json.dumps({"step": step, "term": ctx.term, "rank": ctx.rank,
                                      "world_size": ctx.world_size, "ids": ids,
                                      "children_at_entry": children_at_entry}) + "\n")
                log.flush()
                metrics = {"loss": acc.loss, "step": step}
                if state.step + 1 == total_steps:
                    metrics["params"] = flat_params(model).tolist()
                ctx.report(metrics)

    return train_fn


def _wait_for_file(path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


def _fit(log_dir: Path, total_steps: int, ckpt: et.CheckpointConfig, gate: Optional[Path], callbacks=()):
    return et.ElasticTrainer(
        _make_train_fn(log_dir, total_steps, gate),
        scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH, checkpoint=ckpt, failure=FAILURE, callbacks=list(callbacks),
    ).fit()


def _reference_params(steps: int) -> torch.Tensor:
    """Plain torch in one process: step s is one backward over stream[s*G:(s+1)*G], normalised by its items."""
    torch.manual_seed(TASK.seed)
    data, order = ToyDataset(TASK), _stream_order()
    model = make_model(TASK)
    opt = torch.optim.AdamW(model.parameters(), lr=TASK.lr)
    for s in range(steps):
        x, y, mask = (torch.stack(t) for t in zip(*(data[i] for i in order[s * G:(s + 1) * G])))
        opt.zero_grad()
        total, n = loss_sum(model, (x, y, mask))
        (total / n).backward()
        opt.step()
    return flat_params(model)


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_stream_fed_run_resumes_at_the_exact_sample_after_a_kill_and_a_restart(ray_session, tmp_path):
    log_dir, gate = tmp_path / "log", tmp_path / "killed"
    log_dir.mkdir()
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=5)

    def kill_then_open_the_gate(view):
        kill_follower(view)
        gate.write_text("1")

    fault = At(GATE_STEP - 1, kill_then_open_the_gate, min_members=2)
    first = _fit(log_dir, FIRST_STEPS, ckpt, gate, callbacks=[fault])
    assert fault.fired_at is not None and kinds(first).count("worker_lost") == 1
    assert first.steps == FIRST_STEPS
    second = _fit(log_dir, TOTAL_STEPS, ckpt, None)  # new processes, restored from the checkpoint
    assert any(e["kind"] == "restored_from_checkpoint" and e["step"] == FIRST_STEPS for e in second.events)
    assert second.steps == TOTAL_STEPS

    order, records = _stream_order(), _records(log_dir)
    assert all(r["children_at_entry"] == [] for r in records), "a DataLoader worker outlived its entry"
    for r in records:  # every attempt of every rank read exactly its slice of its step's window
        plan = plan_rank(G, BATCH.micro_batch_size, r["world_size"], r["rank"])
        base = r["step"] * G
        assert r["ids"] == order[base + plan.start:base + plan.stop], r
    terms_by_step: dict[int, set] = {}
    for r in records:
        terms_by_step.setdefault(r["step"], set()).add(r["term"])
    assert sorted(terms_by_step) == list(range(TOTAL_STEPS))
    for step, terms in terms_by_step.items():  # some attempt covered the whole window: each sample once
        whole = []
        for term in terms:
            parts = sorted((r["rank"], r["ids"]) for r in records if r["step"] == step and r["term"] == term)
            ids = [i for _, part in parts for i in part]
            if ids == order[step * G:(step + 1) * G]:
                whole.append(term)
        assert whole, f"no attempt of step {step} covered stream[{step * G}:{(step + 1) * G}] exactly once"
    torch.testing.assert_close(torch.tensor(second.metrics["params"]), _reference_params(TOTAL_STEPS),
                               atol=2e-5, rtol=0)
