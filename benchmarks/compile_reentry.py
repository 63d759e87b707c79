"""Re-entry of train_fn with a torch.compile'd model: the first step of each new model instance in one
process (what a survivor does after a rebuild) against the first compile, for each way of wrapping.

Usage: TORCH_LOGS=recompiles python -m benchmarks.compile_reentry [--backend inductor]
(a recompilation shows in the log; a new group between entries 1 and 2 plays a rebuild)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 8))


WRAPS = {
    "compiled": lambda m, b: torch.compile(m, backend=b),
    "compiled_then_ddp": lambda m, b: torch.nn.parallel.DistributedDataParallel(torch.compile(m, backend=b)),
    "ddp_then_compiled": lambda m, b: torch.compile(torch.nn.parallel.DistributedDataParallel(m), backend=b),
}


def _group(path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(path, 1), rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--entries", type=int, default=3)
    args = parser.parse_args()
    x = torch.randn(16, 64)
    with tempfile.TemporaryDirectory() as tmp:
        for name, wrap in WRAPS.items():
            torch._dynamo.reset()
            _group(os.path.join(tmp, f"{name}-0"))
            for entry in range(args.entries):
                model = wrap(_net(), args.backend)  # train_fn builds new objects on each entry
                start = time.perf_counter()
                model(x).sum().backward()
                first = time.perf_counter() - start
                start = time.perf_counter()
                model(x).sum().backward()
                print(f"{name}: entry {entry} first step {first:.3f} s, next {time.perf_counter() - start:.4f} s")
                dist.destroy_process_group()  # a rebuild: a new group for the next entry
                _group(os.path.join(tmp, f"{name}-{entry + 1}"))
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
