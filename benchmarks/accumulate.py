"""Steps/s of GradAccumulator against a hand-written no_sync loop and a naive per-micro-step all-reduce loop.

Two gloo processes on CPU (127.0.0.1), k = 1, 4, 16 micro-steps per optimizer step,
all variants in one run and interleaved round by round, so machine noise hits each
alike. Writes ``accumulate.json`` and ``accumulate.md`` to the output folder and
quotes medians and ratios against the hand-written loop measured in the same run.

    python -m benchmarks accumulate [--out bench-out] [--repeats 15] [--micro-steps 8]
    python -m benchmarks accumulate --quick     # 3 rounds of 4 micro-steps

Each repeat is one interleaved round (`--rounds` is the old spelling of `--repeats`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import _common as C
from elastictrain.accumulate import GradAccumulator

VARIANTS = ("no_sync", "accumulator", "no_sync_exact", "naive")
KS = (1, 4, 16)
QUICK = {"repeats": 3, "micro_steps": 4}
QUICK_DEADLINE_S = 300


def _net(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(256, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, 256),
    )


def _micro_batches(k: int, micro: int, rank: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1_000_000 * seed + 1000 * k + rank)
    out = []
    for _ in range(k):
        x = torch.randn(micro, 256, generator=g)
        y = torch.randn(micro, 256, generator=g)
        mask = (torch.rand(micro, 1, generator=g) < 0.8).float()
        out.append((x, y, mask))
    return out


def _loss_sum(model, x, y, mask):
    return (((model(x) - y) ** 2) * mask).sum(), mask.sum() * y.shape[1]


def _step_no_sync(model, opt, batches):
    """What users write by hand: no_sync for k-1 micro-steps, a per-micro-batch mean divided by k."""
    opt.zero_grad(set_to_none=True)
    k = len(batches)
    with model.no_sync():
        for x, y, mask in batches[:-1]:
            loss, n = _loss_sum(model, x, y, mask)
            (loss / n / k).backward()
    x, y, mask = batches[-1]
    loss, n = _loss_sum(model, x, y, mask)
    (loss / n / k).backward()
    opt.step()
    return float(loss.detach())


def _step_no_sync_exact(model, opt, batches):
    """The hand-written loop made exact: item counts all-reduced first, each loss divided by the global count."""
    opt.zero_grad(set_to_none=True)
    counts = torch.stack([mask.sum() * y.shape[1] for _, y, mask in batches]).sum().reshape(1)
    dist.all_reduce(counts)
    scale = dist.get_world_size() / counts
    with model.no_sync():
        for x, y, mask in batches[:-1]:
            loss, _ = _loss_sum(model, x, y, mask)
            (loss * scale).backward()
    x, y, mask = batches[-1]
    loss, _ = _loss_sum(model, x, y, mask)
    (loss * scale).backward()
    opt.step()
    return float(loss.detach())


def _step_naive(model, opt, batches):
    """No no_sync: DDP all-reduces the gradient after every micro-step."""
    opt.zero_grad(set_to_none=True)
    k = len(batches)
    for x, y, mask in batches:
        loss, n = _loss_sum(model, x, y, mask)
        (loss / n / k).backward()
    opt.step()
    return float(loss.detach())


def _step_accumulator(acc, model, batches):
    with acc.step(len(batches)) as s:
        for x, y, mask in batches:
            loss, n = _loss_sum(model, x, y, mask)
            s.backward(loss, num_items=n)
    return s.loss


def _worker(rank: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)
    if args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        # One core per process: fewer migrations, so rounds vary less.
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        setups = {}
        for variant in VARIANTS:
            model = DDP(_net(args.hidden, args.seed))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            setups[variant] = (model, opt, GradAccumulator(model, opt))
        data = {k: _micro_batches(k, args.micro_batch, rank, args.seed) for k in KS}

        def run(variant, k, steps):
            model, opt, acc = setups[variant]
            for _ in range(steps):
                if variant == "no_sync":
                    _step_no_sync(model, opt, data[k])
                elif variant == "naive":
                    _step_naive(model, opt, data[k])
                elif variant == "no_sync_exact":
                    _step_no_sync_exact(model, opt, data[k])
                else:
                    _step_accumulator(acc, model, data[k])

        for k in KS:
            for variant in VARIANTS:
                run(variant, k, args.warmup)
        samples = {(v, k): [] for v in VARIANTS for k in KS}
        for rnd in range(args.repeats):
            for k in KS:
                # Rotate the order each round so no variant always runs first after a switch.
                order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[: rnd % len(VARIANTS)]
                for variant in order:
                    steps = -(-args.micro_steps // k)
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    run(variant, k, steps)
                    dist.barrier()
                    wall, cpu = time.perf_counter() - t0, torch.tensor([time.process_time() - c0])
                    # CPU seconds of both processes (all their threads, gloo's included): on a
                    # shared machine this is steadier than wall time, which counts waiting for a core.
                    dist.all_reduce(cpu)
                    samples[(variant, k)].append((steps / wall, 1000.0 * cpu.item() / steps))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({f"{v}|{k}": s for (v, k), s in samples.items()}, f)
    finally:
        # DDP modules hold the process group; drop them first so the group really goes
        # now and not during interpreter teardown.
        setups = {}
        gc.collect()
        dist.destroy_process_group()


def _report(raw: dict, args: argparse.Namespace, wall_s: float) -> tuple[dict, str]:
    rows = []
    for k in KS:
        base = C.median(r[0] for r in raw[f"no_sync|{k}"])
        base_cpu = C.median(r[1] for r in raw[f"no_sync|{k}"])
        for variant in VARIANTS:
            rates = [r[0] for r in raw[f"{variant}|{k}"]]
            cpu = [r[1] for r in raw[f"{variant}|{k}"]]
            med, med_cpu = C.median(rates), C.median(cpu)
            rows.append({
                "k": k, "variant": variant, "median_steps_per_s": med, "ratio_vs_no_sync": med / base,
                "min_steps_per_s": min(rates), "max_steps_per_s": max(rates),
                "median_cpu_ms_per_step": med_cpu, "cpu_ratio_vs_no_sync": med_cpu / base_cpu,
                "rounds_steps_per_s": rates, "rounds_cpu_ms_per_step": cpu,
            })
    result = {
        "benchmark": "accumulate",
        "setup": {
            "processes": 2, "backend": "gloo", "device": "cpu", "threads_per_process": 1, "pinned": args.pin,
            "model": f"MLP 256-{args.hidden}-{args.hidden}-256", "micro_batch": args.micro_batch,
            "optimizer": "AdamW", "rounds": args.repeats, "micro_steps_per_round": args.micro_steps, "warmup": args.warmup,
            "seed": args.seed,
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "wall_s": round(wall_s, 1),
        },
        "results": rows,
    }
    lines = [
        "# GradAccumulator vs hand-written loops (2 gloo processes, CPU)",
        "",
        f"MLP 256-{args.hidden}-{args.hidden}-256, micro-batch {args.micro_batch}, AdamW; "
        f"median of {args.repeats} interleaved rounds of {args.micro_steps} micro-steps; ratio against the hand-written "
        "no_sync loop of the same run.",
        "",
        "no_sync_exact is the hand-written loop made exact the way it can be by hand (item counts "
        "all-reduced before the first forward, which needs every micro-batch up front); naive "
        "all-reduces every micro-step.",
        "",
        "Steps/s is wall clock (higher is better); CPU ms/step sums both processes' CPU time "
        "(lower is better) and is the steadier figure when other work shares the cores.",
        "",
        "| k | variant | median steps/s | ratio vs no_sync | min | max | median CPU ms/step | CPU ratio vs no_sync |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['variant']} | {r['median_steps_per_s']:.3f} | {r['ratio_vs_no_sync']:.3f} "
            f"| {r['min_steps_per_s']:.3f} | {r['max_steps_per_s']:.3f} | {r['median_cpu_ms_per_step']:.1f} "
            f"| {r['cpu_ratio_vs_no_sync']:.3f} |"
        )
    return result, "\n".join(lines) + "\n"


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("accumulate", __doc__, repeats=15, quick=QUICK,
                               help={"repeats": "interleaved rounds per (variant, k) (default: 15)"})
    parser.add_argument(
        "--micro-steps", type=int, default=8,
        help="micro-steps timed per (variant, k) and round: ceil(this / k) optimizer steps",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per (variant, k)")
    parser.add_argument("--hidden", type=int, default=768, help="MLP width")
    parser.add_argument("--micro-batch", type=int, default=192, help="samples per micro-batch per process")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each process to a core")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON and Markdown to the output folder."""
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "accumulate.raw.json")
    t0 = time.perf_counter()
    with C.deadline(args.timeout):
        # daemonic, so that a timeout's exit takes the two processes with it
        mp.spawn(_worker, args=(C.free_port(), args, raw_path), nprocs=2, join=True, daemon=True)
    with open(raw_path) as f:
        raw = json.load(f)
    os.remove(raw_path)
    result, table = _report(raw, args, time.perf_counter() - t0)
    C.write_report(args.out, "accumulate", result, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
