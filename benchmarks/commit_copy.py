"""What the per-commit copy (buffers, RNG states, scheduler, GradScaler, hyperparameters) costs against a
training step of a BatchNorm-heavy conv net (a CIFAR-size ResNet-18 layout), on this machine's device.

Usage: python -m benchmarks.commit_copy [--batch 32] [--repeats 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from elastictrain.runtime.rollback import persistent_buffers
from elastictrain.runtime.state import ElasticState


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        layers.append(Block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=10_000)
    scaler = torch.amp.GradScaler(device.type)
    state = ElasticState({"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "tokens": 0})
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()

    for _ in range(3):
        step()
    kept = state.commit_copy()
    step_s = _median_s(step, args.repeats, device)
    copy_s = _median_s(lambda: state.commit_copy(reuse=kept), args.repeats * 5, device)
    buffers = list(persistent_buffers(model))
    nbuf = sum(b.numel() * b.element_size() for _, b in buffers)
    nparam = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"device {device}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"params {nparam / 2**20:.1f} MiB, {len(buffers)} buffers {nbuf / 2**10:.1f} KiB")
    print(f"step median {step_s * 1e3:.2f} ms; commit copy median {copy_s * 1e3:.3f} ms "
          f"({100 * copy_s / step_s:.2f}% of a step)")


if __name__ == "__main__":
    main()
