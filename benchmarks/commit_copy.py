"""What the per-commit copy (buffers, RNG states, scheduler, GradScaler, hyperparameters) costs against a
training step of a BatchNorm-heavy conv net (a CIFAR-size ResNet-18 layout), on this machine's device.

Usage: python -m benchmarks commit_copy [--batch 32] [--repeats 30] [--device cpu|cuda] [--quick]
Writes commit_copy.json and commit_copy.md to --out.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import _common as C
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
    return C.median(C.time_call(fn, sync=lambda: _sync(device)) for _ in range(repeats))


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("commit_copy", __doc__, repeats=30, quick={"repeats": 3, "batch": 8},
                               help={"repeats": "timed training steps; the copy is timed 5x as often (default: 30)"})
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with C.deadline(args.timeout):
        figures = measure(args)
    lines = [f"device {figures['device']}, batch {args.batch}, torch {torch.__version__}, {figures['threads']} threads",
             f"params {figures['params_mib']:.1f} MiB, {figures['buffers']} buffers {figures['buffers_kib']:.1f} KiB",
             f"step median {figures['step_ms']:.2f} ms; commit copy median {figures['copy_ms']:.3f} ms "
             f"({figures['copy_pct_of_step']:.2f}% of a step)"]
    print("\n".join(lines))
    data = {"benchmark": "commit_copy", "command": C.command_line("commit_copy", argv), "params": vars(args),
            "machine": C.machine_info(), **figures}
    C.write_report(args.out, "commit_copy", data,
                   "# Per-commit copy against a training step (ResNet-18 layout)\n\n" + "\n\n".join(lines) + "\n")
    return 0


def measure(args) -> dict:
    """Median step and median commit copy of a ResNet-18-layout net with a scheduler and a GradScaler."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
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
    return {"device": str(device), "threads": torch.get_num_threads(), "params_mib": nparam / 2**20,
            "buffers": len(buffers), "buffers_kib": nbuf / 2**10, "step_ms": step_s * 1e3, "copy_ms": copy_s * 1e3,
            "copy_pct_of_step": 100 * copy_s / step_s}


if __name__ == "__main__":
    raise SystemExit(main())
