"""GradAccumulator over real gloo process groups (spawned processes on 127.0.0.1, no Ray).

The same seeded job runs at world sizes 1, 2 and 3 and across a 2 -> 3 world
change; final parameters, first-step gradients and the sample sequence must match
a single process that sees each whole global batch at once.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from elastictrain.accumulate import GradAccumulator, micro_batches, sample_indices
from elastictrain.config import BatchConfig

# 40 samples, G=10: 4 steps per epoch, so 5 steps cross an epoch. Micro-batches of 2:
# W=1 runs k=5; W=2 runs 5+5 samples as (2,2,1); W=3 runs 4+3+3 as (2,2),(2,1),(2,1).
BATCH = BatchConfig(global_batch_size=10, micro_batch_size=2, seed=11)
STEPS = 5
RESUME_AT = 2
BATCH_K1 = BatchConfig(global_batch_size=10, micro_batch_size=5, seed=11)
LR = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(40, 4, generator=g)
    y = torch.randn(40, 3, generator=g)
    # Item counts per sample from 0 to 3: a mean of per-micro-batch means would be wrong.
    mask = (torch.rand(40, 3, generator=g) < torch.rand(40, 1, generator=g)).float()
    return [(x[i], y[i], mask[i]) for i in range(40)]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _loss_sum(model, batch):
    x, y, mask = batch
    return (((model(x) - y) ** 2) * mask).sum(), mask.sum()


def _counting_hook(counter, bucket):
    counter[0] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _train(rank, world, *, steps, ddp=True, k_known=True, state=None, save_after=None, batch_cfg=BATCH, bf16=False):
    net = _net().to(torch.bfloat16) if bf16 else _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    model = DDP(net) if ddp else net
    calls = [0]
    if ddp:
        model.register_comm_hook(calls, _counting_hook)
    acc = GradAccumulator(model, opt, fp32_grad_accum=bf16)
    data = _dataset()
    out = {"indices": {}, "loss": {}, "items": {}, "calls_per_step": []}
    for step in steps:
        it = micro_batches(data, step, rank=rank, world_size=world, batch=batch_cfg)
        out["indices"][step] = [g.tolist() for g in it.indices]
        before = calls[0]
        with acc.step(len(it) if k_known else None) as s:
            for batch in it:
                if bf16:
                    x, y, mask = batch
                    loss, n = (((model(x.bfloat16()).float() - y) ** 2) * mask).sum(), mask.sum()
                else:
                    loss, n = _loss_sum(model, batch)
                s.backward(loss, num_items=n)
        out["calls_per_step"].append(calls[0] - before)
        out["loss"][step], out["items"][step] = s.loss, s.num_items
        if step == steps[0]:
            out["grads"] = [p.grad.clone() for p in net.parameters()]
        if step == save_after:
            out["state"] = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict()})
    out["params"] = [p.detach().clone() for p in net.parameters()]
    return out


def _scaler_skip(rank):
    """fp16 + GradScaler over DDP: an inf on rank 0 only must skip the step on every rank."""
    model = DDP(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = GradAccumulator(model, opt, scaler=scaler, autocast_dtype=torch.float16)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    out = {"skipped": [], "scale": [], "params": []}
    for step in range(3):
        with acc.step(2) as s:
            for xb, yb in zip(x.split(2), y.split(2)):
                loss = ((model(xb).float() - yb) ** 2).sum()
                poison = step == 1 and rank == 0
                s.backward(loss * (float("inf") if poison else 1.0), num_items=xb.shape[0])
        out["skipped"].append(s.skipped)
        out["scale"].append(scaler.get_scale())
        out["params"].append(model.module.weight.detach().clone())
    return out


def _worker(rank, world, port, out_dir, resume_from):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        results = {"ddp": _train(rank, world, steps=list(range(STEPS)), save_after=RESUME_AT - 1)}
        # One micro-batch per rank (k=1): no no_sync at all, the count reduce still overlaps.
        results["k1"] = _train(rank, world, steps=list(range(STEPS)), batch_cfg=BATCH_K1)
        if resume_from is not None:
            state = torch.load(resume_from, weights_only=False)["ddp"]["state"]
            results["resumed"] = _train(rank, world, steps=list(range(RESUME_AT, STEPS)), state=state)
        if world == 2:
            results["plain"] = _train(rank, world, steps=list(range(STEPS)), ddp=False)
            results["k_unknown"] = _train(rank, world, steps=list(range(STEPS)), k_known=False)
            results["scaler"] = _scaler_skip(rank)
            results["bf16_fp32_accum"] = _train(rank, world, steps=[0], bf16=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Results are on disk and the group is destroyed; skip interpreter teardown, where
    # torch's gloo destructors now and then abort a loaded machine's child process.
    os._exit(0)


def _spawn(world, out_dir, resume_from=None):
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), out_dir, resume_from), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _reference(normalise="global"):
    """One process, each whole global batch at once (or the mean-of-means bug, to show it differs)."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    data = _dataset()
    seq, grads = {}, None
    for step in range(STEPS):
        idx = sample_indices(len(data), step, rank=0, world_size=1, batch=BATCH)
        seq[step] = [i for g in idx for i in g.tolist()]
        opt.zero_grad()
        if normalise == "global":
            x, y, m = (torch.stack([data[i][j] for i in seq[step]]) for j in range(3))
            loss, n = _loss_sum(net, (x, y, m))
            (loss / n).backward()
        else:
            for g in idx:
                x, y, m = (torch.stack([data[i][j] for i in g.tolist()]) for j in range(3))
                loss, n = _loss_sum(net, (x, y, m))
                (loss / n.clamp(min=1) / len(idx)).backward()
        if grads is None:
            grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
    return {"params": [p.detach().clone() for p in net.parameters()], "grads": grads, "seq": seq}


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("acc")
    one = _run_world_one()
    two = _spawn(2, str(base / "w2"))
    three = _spawn(3, str(base / "w3"), resume_from=str(base / "w2" / "rank0.pt"))
    return {1: one, 2: two, 3: three, "ref": _reference(), "mean_of_means": _reference("per_micro")}


def _run_world_one():
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return [{"ddp": _train(0, 1, steps=list(range(STEPS)))}]
    finally:
        dist.destroy_process_group()


def test_final_params_agree_at_world_sizes_1_2_3(runs):
    ref = runs["ref"]["params"]
    assert _max_diff(runs["mean_of_means"]["params"], ref) > 1e-3  # the masks make the bug visible
    for world in (1, 2, 3):
        for rank_out in runs[world]:
            assert _max_diff(rank_out["ddp"]["params"], ref) < 2e-5, world
    for world in (2, 3):
        for rank_out in runs[world]:
            assert rank_out["k1"]["calls_per_step"] == [1] * STEPS
            assert _max_diff(rank_out["k1"]["params"], ref) < 2e-5
    for rank_out in runs[2]:
        assert _max_diff(rank_out["plain"]["params"], ref) < 2e-5  # no DDP: accumulator reduces
        assert _max_diff(rank_out["k_unknown"]["params"], ref) < 2e-5  # k=None: one reduce at the end


def test_gradient_equals_single_process_gradient_of_global_batch(runs):
    for world in (1, 2, 3):
        for rank_out in runs[world]:
            assert _max_diff(rank_out["ddp"]["grads"], runs["ref"]["grads"]) < 1e-6


def test_loss_and_item_count_are_global(runs):
    data = _dataset()
    for step, seq in runs["ref"]["seq"].items():
        n = sum(float(data[i][2].sum()) for i in seq)
        for world in (1, 2, 3):
            for rank_out in runs[world]:
                assert rank_out["ddp"]["items"][step] == n
        for world in (2, 3):
            losses = {r["ddp"]["loss"][step] for r in runs[world]}
            assert len(losses) == 1  # every rank reports the same global mean
            assert losses.pop() == pytest.approx(runs[1][0]["ddp"]["loss"][step], rel=1e-5)


def test_one_gradient_all_reduce_per_optimizer_step(runs):
    for world in (1, 2, 3):
        for rank_out in runs[world]:
            assert rank_out["ddp"]["calls_per_step"] == [1] * STEPS
    assert max(len(g) for g in runs[2][0]["ddp"]["indices"][0]) > 0 and len(runs[2][0]["ddp"]["indices"][0]) == 3


def test_sample_sequence_identical_across_world_sizes_and_change(runs):
    ref = runs["ref"]["seq"]
    for world in (1, 2, 3):
        for step in range(STEPS):
            seen = [i for r in runs[world] for g in r["ddp"]["indices"][step] for i in g]
            assert seen == ref[step]
    # 2 -> 3: steps 0..1 on two ranks, then 2..4 on three ranks, resumed from the step number only.
    for step in range(RESUME_AT):
        assert [i for r in runs[2] for g in r["ddp"]["indices"][step] for i in g] == ref[step]
    for step in range(RESUME_AT, STEPS):
        assert [i for r in runs[3] for g in r["resumed"]["indices"][step] for i in g] == ref[step]
    for rank_out in runs[3]:
        assert _max_diff(rank_out["resumed"]["params"], runs["ref"]["params"]) < 2e-5


def test_fp16_scaler_skips_on_every_rank(runs):
    outs = [r["scaler"] for r in runs[2]]
    for out in outs:
        assert out["skipped"] == [False, True, False]
        assert out["scale"] == [1024.0, 512.0, 512.0]
        assert torch.equal(out["params"][0], out["params"][1])  # the skipped step left params alone
        assert not torch.equal(out["params"][1], out["params"][2])
    assert torch.equal(outs[0]["params"][2], outs[1]["params"][2])


def test_fp32_accumulation_of_bf16_params_under_ddp(runs):
    outs = [r["bf16_fp32_accum"] for r in runs[2]]
    for out in outs:
        assert out["calls_per_step"] == [0]  # reduced once by the accumulator, in fp32, not by DDP
        assert all(g.dtype == torch.bfloat16 for g in out["grads"])
        for g, r in zip(out["grads"], runs["ref"]["grads"]):
            torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=2e-3)
    assert all(torch.equal(a, b) for a, b in zip(outs[0]["params"], outs[1]["params"]))
