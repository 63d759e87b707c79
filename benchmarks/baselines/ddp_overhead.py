"""Overhead baseline: a plain torch DDP loop under torchrun, nothing fails.

Launched by `python -m benchmarks overhead` as
    torchrun --standalone --nproc-per-node 2 --module benchmarks.baselines.ddp_overhead --out-file F ...
Each step is the same work as the elastictrain arm: the rank's share of a
global batch in micro-batches, one gradient all-reduce (DDP no_sync on all but
the last micro-batch), an AdamW step. Rank 0 times steps [warmup, steps) with
time.perf_counter and writes the figures to --out-file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import _common as C


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out-file", required=True)
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    a = p.parse_args()

    C.set_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = C.make_dataset("work", seed=a.seed)
    model = DDP(C.make_model("work", seed=a.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    t_start = None
    for step in range(a.steps):
        t0 = time.perf_counter()
        if step == a.warmup:
            t_start = t0
        opt.zero_grad(set_to_none=True)
        mbs = C.micro_batches(data, step, a.global_batch, a.micro_batch, rank, world)
        C.ddp_accumulate(model, mbs, a.global_batch)
        opt.step()
        times.append(time.perf_counter() - t0)
    t_end = time.perf_counter()
    if rank == 0:
        timed = a.steps - a.warmup
        Path(a.out_file).write_text(json.dumps({
            "steps_per_s": timed / (t_end - t_start),
            "median_step_s": C.median(times[a.warmup:]),
            "timed_steps": timed,
            "world_size": world,
            "rank0_items_per_step": sum(len(mb[0]) for mb in mbs),
            "rank0_micro_batches_per_step": len(mbs),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
