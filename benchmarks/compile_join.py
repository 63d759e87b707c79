"""A joiner's first compiled step with an empty inductor cache: cold, against after loading the portable
compile-cache artifacts ("mega-cache") that another process saved.

Each trial is a fresh Python process with its own empty TORCHINDUCTOR_CACHE_DIR (a new machine's cold
cache). A producer process compiles once and saves its artifacts; a "loaded" trial hands those bytes to
`torch.compiler.load_cache_artifacts` before its first forward, as a joining worker would after the
state broadcast.

Usage: python -m benchmarks compile_join [--model block|mlp] [--device cpu|cuda] [--repeats 3] [--out DIR]

Measured on CPU: a cache hit skips inductor's lowering and code generation, but the C++ kernels are not
among the artifacts, so the joiner still runs g++ on every kernel, which is most of a CPU compile
(the per-phase times are in each trial's `phases_s`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _common as C
from benchmarks._common import child_env, fmt, md_table, median, run_child, tail, write_report


class Block(torch.nn.Module):
    """A transformer block (pre-norm attention + MLP), the shape of most models users compile."""

    def __init__(self, dim: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


def _model(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "block":
        return torch.nn.Sequential(Block(), Block()), torch.randn(4, 64, 256)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 8))  # the model of benchmarks/compile_reentry.py
    return net, torch.randn(16, 64)


def child(args: argparse.Namespace) -> None:
    """One process: optionally load artifacts, time the first compiled step, optionally save artifacts."""
    torch.set_num_threads(1)
    out: dict = {"role": args.role}
    if args.load:
        start = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(Path(args.load).read_bytes())
        out["load_s"] = time.perf_counter() - start
        out["loaded"] = {k: len(v) for k, v in (info.artifacts.items() if info else [])}
    model, x = _model(args.model)
    device = torch.device(args.device)
    compiled = torch.compile(model.to(device))
    x = x.to(device)
    for key in ("first_step_s", "next_step_s"):
        start = time.perf_counter()
        compiled(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[key] = time.perf_counter() - start
    from torch._dynamo.utils import compilation_time_metrics, counters

    out["phases_s"] = {k: round(sum(v), 3) for k, v in compilation_time_metrics.items() if sum(v) >= 0.05}
    out["fxgraph_cache_hit"] = counters["inductor"]["fxgraph_cache_hit"]
    out["fxgraph_cache_miss"] = counters["inductor"]["fxgraph_cache_miss"]
    out["autograd_cache_hit"] = counters["aot_autograd"]["autograd_cache_hit"]
    if args.save:
        start = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        out["save_s"] = time.perf_counter() - start
        data = saved[0] if saved else b""
        Path(args.save).write_bytes(data)
        out["artifact_bytes"] = len(data)
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(tmp: Path, name: str, model: str, device: str, *, load: str = "", save: str = "",
           timeout_s: float = 900) -> dict:
    cache = tmp / f"cache-{name}"
    cache.mkdir()  # empty: this process finds nothing on disk
    cmd = [sys.executable, "-m", "benchmarks.compile_join", "--child", "--model", model, "--device", device,
           "--role", name]
    cmd += ["--load", load] if load else []
    cmd += ["--save", save] if save else []
    env = child_env({"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache / "triton"})
    log = tmp / f"{name}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ran = run_child(cmd, timeout_s, log, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in tail(log, 100_000).splitlines() if ln.startswith("RESULT ")]
    if ran["rc"] != 0 or not lines:
        raise RuntimeError(f"{name} failed (rc {ran['rc']}):\n{tail(log)}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    # CPU seconds of the whole process and its compiler subprocesses: less sensitive to a busy machine than wall time
    result["process_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("compile_join", __doc__, repeats=3, quick={"repeats": 1, "model": "mlp"},
                               no_effect={"seed": "the models are seeded by their own constructor order"},
                               help={"repeats": "interleaved cold/loaded trial pairs (default: 3)"})
    parser.add_argument("--model", choices=["block", "mlp"], default="block")
    parser.add_argument("--device", default="cpu", help="cuda: Triton kernels, which inductor bundles into its "
                        "cached graphs, instead of C++ kernels, which it does not")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="", help=argparse.SUPPRESS)
    parser.add_argument("--load", default="", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="et-compile-join-") as tmp_name:
        tmp = Path(tmp_name)
        artifacts = str(tmp / "artifacts.bin")
        producer = _spawn(tmp, "producer", args.model, args.device, save=artifacts)
        print(f"producer: first step {producer['first_step_s']:.2f} s, artifacts {producer['artifact_bytes']} bytes "
              f"(saved in {producer['save_s']:.3f} s)", flush=True)
        if not producer["artifact_bytes"]:
            raise SystemExit("the producer saved no artifacts: nothing to compare")
        trials = []
        for i in range(args.repeats):  # interleaved, so load drift hits both arms alike
            cold = _spawn(tmp, f"cold-{i}", args.model, args.device)
            loaded = _spawn(tmp, f"loaded-{i}", args.model, args.device, load=artifacts)
            trials.append({"cold": cold, "loaded": loaded})
            print(f"trial {i}: cold {cold['first_step_s']:.2f} s (hits {cold['fxgraph_cache_hit']}), loaded "
                  f"{loaded['load_s']:.3f} s + {loaded['first_step_s']:.2f} s (hits {loaded['fxgraph_cache_hit']}); process CPU "
              f"{cold['process_cpu_s']:.1f} s vs {loaded['process_cpu_s']:.1f} s",
                  flush=True)
    cold_s = median(t["cold"]["first_step_s"] for t in trials)
    load_s = median(t["loaded"]["load_s"] for t in trials)
    loaded_s = median(t["loaded"]["first_step_s"] for t in trials)
    loaded_total = median(t["loaded"]["load_s"] + t["loaded"]["first_step_s"] for t in trials)
    cold_cpu = median(t["cold"]["process_cpu_s"] for t in trials)
    loaded_cpu = median(t["loaded"]["process_cpu_s"] for t in trials)
    rows = [[args.model, producer["artifact_bytes"], fmt(cold_s, 2, " s"), fmt(load_s, 2, " s"),
             fmt(loaded_s, 2, " s"), fmt(cold_s / loaded_total if loaded_total else None, 2, "x"),
             f"{fmt(cold_cpu, 1)} / {fmt(loaded_cpu, 1)} s"]]
    table = md_table(["model", "artifacts (bytes)", "cold first step", "load", "first step after load",
                      "cold / (load + first step)", "process CPU cold / loaded"], rows)
    print(table)
    if args.out:
        data = {"model": args.model, "device": args.device, "producer": producer, "trials": trials, "median_cold_s": cold_s,
                "median_load_s": load_s, "median_loaded_first_step_s": loaded_s}
        write_report(args.out, f"compile_join_{args.model}", data, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
