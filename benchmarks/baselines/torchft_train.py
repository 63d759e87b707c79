"""Recovery baseline: one torchft replica group of one process.

`python -m benchmarks recovery` starts a `torchft_lighthouse` and N of these
(`python -m benchmarks.baselines.torchft_train`), one per replica. Each process
hosts its own replica group's TCPStore (world size 1 in the group) and trains
with torchft's DistributedDataParallel and Optimizer wrappers; gradients are
averaged across replicas through torchft's reconfigurable gloo group. When a
replica dies, the survivors' step fails (should_commit is False) and the next
quorum forms without it once the lighthouse stops hearing its heartbeat; no
state is reloaded, so no step is redone. The lost replica is not restarted: the
run goes on with the survivors.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import torch
from torch.distributed import TCPStore

from benchmarks import _common as C


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--replica-id", type=int, required=True)
    p.add_argument("--num-replicas", type=int, default=3)
    p.add_argument("--min-replicas", type=int, default=2)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--marker", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-step", type=int, default=25)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--global-batch", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    p.add_argument("--hidden", type=int, default=0, help="width of the MLP's hidden layers (0: the tiny model's)")
    a = p.parse_args()

    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    C.set_threads(1)
    rid = a.replica_id
    log = C.StepLog(a.log_dir, rid)
    store_port = C.free_port()
    store = TCPStore("127.0.0.1", store_port, is_master=True, wait_for_workers=False)  # noqa: F841 (kept alive)

    data = C.make_dataset("tiny", seed=a.seed)
    model = C.make_model("tiny", seed=a.seed, hidden=a.hidden or None)
    inner_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        inner_opt.load_state_dict(sd["optim"])

    def state_dict():
        return {"model": model.state_dict(), "optim": inner_opt.state_dict()}

    timeout = timedelta(seconds=a.timeout_s)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        min_replica_size=a.min_replicas,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"replica{rid}",
        store_addr="127.0.0.1",
        store_port=store_port,
        rank=0,
        world_size=1,
        lighthouse_addr=a.lighthouse,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=max(60.0, a.timeout_s)),
        connect_timeout=timeout,
    )
    ddp = DistributedDataParallel(manager, model)
    opt = Optimizer(manager, inner_opt)
    try:
        while manager.current_step() < a.steps:
            step = manager.current_step()
            C.maybe_kill(a.marker, rid, step, a.kill_rank, a.kill_step)
            time.sleep(a.step_sleep)
            opt.zero_grad()  # starts the quorum for this step
            mbs = C.micro_batches(data, step, a.global_batch, a.micro_batch, rid, a.num_replicas)
            C.ddp_accumulate(ddp, mbs, a.global_batch)
            opt.step()  # applies the update only if should_commit
            if manager.current_step() > step:
                log.step(step, participants=manager.num_participants())
    finally:
        log.close()
        manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
