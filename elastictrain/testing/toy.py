"""A small seeded regression task for the demo, the tests and the benchmarks.

Every sample carries a mask with 1 to `items` valid targets, so the item count
varies per sample and a mean of per-rank means would give a different gradient
than the global normalisation. `reference_params` trains the same steps in one
process, without Ray: what any elastic run must end with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from elastictrain.config import BatchConfig

__all__ = ["ToyTask", "ToyDataset", "make_model", "loss_sum", "make_train_fn", "flat_params", "reference_params"]


@dataclass(frozen=True)
class ToyTask:
    """The knobs of the toy run."""

    total_steps: int = 30
    samples: int = 512
    features: int = 16
    hidden: int = 32
    items: int = 4
    lr: float = 0.01
    seed: int = 0
    step_sleep_s: float = 0.0
    """Extra time per step, so that faults injected by step number land mid-run."""


class ToyDataset(torch.utils.data.Dataset):
    """Map-style: sample i is (x, y, mask), all from one seeded generator."""

    def __init__(self, task: ToyTask) -> None:
        g = torch.Generator().manual_seed(task.seed + 1)
        self.x = torch.randn(task.samples, task.features, generator=g)
        w = torch.randn(task.features, task.items, generator=g)
        self.y = torch.tanh(self.x @ w) + 0.1 * torch.randn(task.samples, task.items, generator=g)
        counts = torch.randint(1, task.items + 1, (task.samples,), generator=g)
        self.mask = (torch.arange(task.items)[None, :] < counts[:, None]).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.mask[i]


def make_model(task: ToyTask) -> torch.nn.Module:
    torch.manual_seed(task.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(task.features, task.hidden), torch.nn.Tanh(), torch.nn.Linear(task.hidden, task.items)
    )


def loss_sum(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed masked squared error and the number of valid items."""
    x, y, mask = batch
    return (((model(x) - y) ** 2) * mask).sum(), mask.sum()


def model_and_optimizer(ctx, task: ToyTask, keep_objects: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The toy model, prepared for the world, and its AdamW: kept across entries (`ctx.keep`, the documented
    form) or, without `keep_objects`, built again on every entry (the older form)."""
    if keep_objects:
        net = ctx.keep("net", lambda: make_model(task))
        return ctx.prepare_model(net), ctx.keep("opt", lambda: torch.optim.AdamW(net.parameters(), lr=task.lr))
    model = ctx.prepare_model(make_model(task))
    return model, torch.optim.AdamW(model.parameters(), lr=task.lr)


def make_train_fn(task: ToyTask, on_step: Optional[Callable] = None, *, keep_objects: bool = True) -> Callable:
    """The training loop of the README, on the toy task; reports loss and final weights.

    With `keep_objects` (the documented form) a survivor re-enters with its model and optimizer
    (`ctx.keep`); without it every entry builds them again and loads the state into them (the older form).
    """

    def train_fn(ctx) -> None:
        dataset = ToyDataset(task)
        model, opt = model_and_optimizer(ctx, task, keep_objects)
        state = ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=task.total_steps):
            with ctx.accumulate(model, opt) as acc:
                for batch in ctx.micro_batches(dataset, step):
                    total, n = loss_sum(model, batch)
                    acc.backward(total, num_items=n)
            if task.step_sleep_s:
                time.sleep(task.step_sleep_s)
            if on_step is not None:
                on_step(ctx, step)
            metrics = {"loss": acc.loss, "step": step, "world_size": ctx.world_size, "t": time.time()}
            if state.step + 1 == task.total_steps:
                metrics["params"] = flat_params(model).tolist()
            ctx.report(metrics)

    return train_fn


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    module = getattr(model, "module", model)
    return torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])


def reference_params(task: ToyTask, batch: BatchConfig, steps: Optional[int] = None) -> torch.Tensor:
    """Train `steps` (default: all) in one process, no Ray: the parameters an elastic run must match."""
    from elastictrain.accumulate import GradAccumulator, micro_batches, plan_rank

    torch.manual_seed(task.seed)
    dataset = ToyDataset(task)
    model = make_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    acc = GradAccumulator(model, opt)
    k = plan_rank(batch.global_batch_size, batch.micro_batch_size, 1, 0).num_micro_batches
    for step in range(task.total_steps if steps is None else steps):
        with acc.step(num_micro_batches=k) as s:
            for b in micro_batches(dataset, step, rank=0, world_size=1, batch=batch):
                total, n = loss_sum(model, b)
                s.backward(total, num_items=n)
    return flat_params(model)
