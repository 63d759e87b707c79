"""The minimal elastictrain loop: a small MLP on synthetic data, elastic over 2-3 workers.

    python examples/minimal.py --steps 50
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python examples/minimal.py --steps 20

`--fail-at N` makes the loop raise at step N, to see (and test) how a broken
training loop ends a job: non-zero exit and the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

import elastictrain as et


class Regression(torch.utils.data.Dataset):
    """4096 seeded samples of y = sin(x @ w)."""

    def __init__(self, n: int = 4096, dim: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(dim, 1, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_train_fn(total_steps: int, fail_at: Optional[int] = None):
    def train_fn(ctx: et.Context) -> None:
        dataset = Regression()
        model = ctx.prepare_model(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        state = ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=total_steps):
            if fail_at is not None and step == fail_at:
                raise RuntimeError(f"training loop failed on purpose at step {step} (--fail-at)")
            with ctx.accumulate(model, opt) as acc:
                for x, y in ctx.micro_batches(dataset, step):
                    acc.backward(((model(x) - y) ** 2).sum(), num_items=len(x))
            ctx.report({"loss": acc.loss})
        if ctx.rank == 0:
            print(f"finished at step {state.step}, world size {ctx.world_size}, loss {acc.loss:.4f}", flush=True)

    return train_fn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint-uri", default=None)
    parser.add_argument("--fail-at", type=int, default=None, help="raise in the loop at this step (to test failure)")
    args = parser.parse_args()
    try:
        result = run(args)
    except et.TrainingFailed as exc:
        print(f"minimal: training failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"steps={result.steps} loss={result.metrics['loss']:.4f} checkpoint={result.checkpoint_uri}")
    return 0


def run(args: argparse.Namespace) -> et.Result:
    return et.ElasticTrainer(
        make_train_fn(args.steps, args.fail_at),
        scaling=et.ScalingConfig(min_workers=1, max_workers=args.workers),
        batch=et.BatchConfig(global_batch_size=64, micro_batch_size=16),
        checkpoint=et.CheckpointConfig(uri=args.checkpoint_uri, every_steps=10) if args.checkpoint_uri else None,
        run=et.RunConfig(progress=True, progress_total=args.steps),
    ).fit()


if __name__ == "__main__":
    sys.exit(main())
