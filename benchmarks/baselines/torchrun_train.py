"""Recovery baseline: a plain DDP loop under torchrun, checkpointing every N steps.

Launched by `python -m benchmarks recovery` as
    torchrun --nnodes 1 --nproc-per-node 3 --max-restarts 3 \
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT --rdzv-id ID \
        --module benchmarks.baselines.torchrun_train --log-dir ... --marker ... --ckpt-dir ...
On a worker's death torchrun stops the whole group and restarts it; the loop
resumes from the newest checkpoint (rank 0 writes it; os.replace makes it atomic).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import _common as C


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--marker", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-step", type=int, default=25)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--global-batch", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    p.add_argument(
        "--store-per-restart", action="store_true",
        help="prefix the process group's store keys with the restart count (works around pytorch#135712)",
    )
    a = p.parse_args()

    C.set_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = timedelta(seconds=60)
    if a.store_per_restart:
        # With the c10d rendezvous the agent's store outlives a restart, and the
        # restarted ranks read the dead group's gloo addresses from it and fail or
        # hang (pytorch#135712). Give each restart its own key space.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                             is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"restart-{attempt}/", base)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = C.StepLog(a.log_dir, rank, attempt=attempt)

    data = C.make_dataset("tiny", seed=a.seed)
    model = DDP(C.make_model("tiny", seed=a.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = Path(a.ckpt_dir) / "latest.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["next_step"])

    for step in range(start, a.steps):
        C.maybe_kill(a.marker, rank, step, a.kill_rank, a.kill_step)
        time.sleep(a.step_sleep)
        opt.zero_grad(set_to_none=True)
        mbs = C.micro_batches(data, step, a.global_batch, a.micro_batch, rank, world)
        C.ddp_accumulate(model, mbs, a.global_batch)
        opt.step()
        log.step(step)
        if (step + 1) % a.ckpt_every == 0 and rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {"model": model.module.state_dict(), "optimizer": opt.state_dict(), "next_step": step + 1}, tmp
            )
            os.replace(tmp, ckpt)
    log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
