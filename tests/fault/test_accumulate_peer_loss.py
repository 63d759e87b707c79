"""A peer that dies inside a step: the survivor's collective raises, its optimizer does not step."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from elastictrain.accumulate import GradAccumulator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir, dies_at_micro_step):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=5)
    )
    result = {}
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        acc = GradAccumulator(model, opt)
        x = torch.randn(6, 4)

        def one_step(step):
            with acc.step(3) as s:
                for i, xb in enumerate(x.split(2)):
                    if rank == 1 and step == 1 and i == dies_at_micro_step:
                        os._exit(0)  # a preempted machine: no goodbye, sockets close
                    s.backward(model(xb).pow(2).sum(), num_items=xb.shape[0])

        one_step(0)
        committed = [p.detach().clone() for p in model.parameters()]
        momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        try:
            one_step(1)
            result["error"] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            result["error"] = (type(exc).__name__, isinstance(exc, RuntimeError), str(exc))
        result["params_unchanged"] = all(torch.equal(p, c) for p, c in zip(model.parameters(), committed))
        result["momentum_unchanged"] = all(
            torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum)
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Results are on disk and the group is destroyed; skip interpreter teardown, where
    # torch's gloo destructors now and then abort a loaded machine's child process.
    os._exit(0)


def _run(tmp_path, dies_at):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), dies_at), nprocs=2, join=True)
    return torch.load(os.path.join(tmp_path, "rank0.pt"), weights_only=False)


def test_peer_lost_before_last_micro_step_raises_without_optimizer_step(tmp_path):
    out = _run(tmp_path, dies_at=2)  # rank 0 reaches the gradient all-reduce, rank 1 never does
    assert out["error"] is not None, "the survivor's step should have failed"
    name, is_runtime_error, message = out["error"]
    assert is_runtime_error, name  # gloo's own error, not wrapped
    assert any(w in message.lower() for w in ("connection", "closed", "timed out", "timeout", "reset")), message
    assert out["params_unchanged"] and out["momentum_unchanged"]
