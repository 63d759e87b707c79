"""Driver memory of a long run: what `fit()` keeps of its records, per step.

Two arms, measured in one process with tracemalloc (Python allocations):

- `records` (default, no Ray): the records a run of `--steps` steps on `--world` ranks
  sends (a commit per rank per step, rank 0's metrics per step, an event per failure)
  folded into the driver's `RunLog`, against a plain list that keeps every record
  (what the driver kept before). Both are fed the same records.
- `--real`: an actual `ElasticTrainer.fit()` of `--steps` near-empty steps on a local
  Ray cluster, reporting each step's loss; traced on the driver from before `fit()`
  to after the Result is built (the Result's history, one report per step, included).
  A callback samples the driver at every tenth of the run, so the figures separate
  what grows with steps (the slope, fitted over the samples) from what `fit()` costs
  once (Ray's start and the modules it imports: torch, ray). Each sample also reads
  the process's RSS; RSS less the traced heap and tracemalloc's own tables is native
  memory (Ray's core worker, the allocator). `--no-report` runs the same loop without
  `ctx.report`, so what still grows is the runtime's and Ray's, not the records'.
  `--breakdown` traces 30 frames deep and groups what is left at the end by origin;
  `--no-trace` reads RSS alone (tracemalloc's own tables and the allocator churn of
  its hash table inflate RSS by several hundred bytes a step).

    python -m benchmarks driver_memory --steps 100000
    python -m benchmarks driver_memory --real --steps 100000
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
from typing import Optional

from benchmarks import _common as C


def _records(steps: int, world: int, failures: int):
    """The records a run sends, in the order a driver would pull them."""
    every = max(1, steps // (failures + 1))
    term = 1
    for step in range(steps):
        if step and step % every == 0 and failures:
            term += 1
            yield {"kind": "world_changed", "time": time.time(), "term": term - 1, "step": step, "in_flight": step,
                   "member": "w001", "reason": "Connection reset by peer"}
            for rank in range(world):
                yield {"kind": "joined", "time": time.time(), "term": term, "rank": rank, "world_size": world,
                       "leader": rank == 0, "member": f"w{rank:03d}", "pid": 1000 + rank, "node_id": "n"}
        for rank in range(world):
            yield {"kind": "commit", "time": time.time(), "term": term, "step": step, "rank": rank, "member": f"w{rank:03d}"}
        yield {"kind": "metrics", "time": time.time(), "step": step, "term": term, "member": "w000",
               "loss": 1.0 / (step + 1), "world_size": world, "lr": 3e-4}


def _traced(build) -> tuple[float, float, object]:
    gc.collect()
    tracemalloc.start()
    kept = build()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / 2**20, peak / 2**20, kept


def run_records(steps: int, world: int, failures: int) -> dict:
    from elastictrain.runtime.runlog import RunLog

    def fold():
        log = RunLog()
        for record in _records(steps, world, failures):
            log.add(record)
        return log

    def keep_all():
        return list(_records(steps, world, failures))

    log_mb, log_peak, log = _traced(fold)
    all_mb, all_peak, kept = _traced(keep_all)
    return {
        "arm": "records", "steps": steps, "world": world, "failures": failures,
        "runlog_mib": round(log_mb, 2), "runlog_peak_mib": round(log_peak, 2),
        "keep_every_record_mib": round(all_mb, 2),
        "ratio_runlog_vs_every_record": round(log_mb / all_mb, 3),
        "runlog_bytes_per_step": round(log_mb * 2**20 / steps, 1),
        "reports_kept": len(log.history()), "records_sent": len(kept),
    }


def _rss() -> Optional[int]:
    """Resident set size of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, bytes) points: bytes per step."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def _origin(frames: list[str]) -> str:
    """Which part of the driver allocated a block still alive at the end, from its traceback's files."""
    if any(f.endswith("runlog.py") for f in frames):
        return "RunLog: the records kept"
    if any("importlib" in f or f.startswith("<frozen") for f in frames):
        package = next((f.split("site-packages/")[1].split("/")[0] for f in frames if "site-packages/" in f), "other")
        return f"modules imported during fit: {package.removesuffix('.py')}"
    if any(f.endswith("serialization.py") for f in frames):
        return "values deserialized from workers' records, still referenced"
    if any("/ray/" in f for f in frames):
        return "ray, other"
    return "other"


def _breakdown(snapshot) -> list[dict]:
    groups: dict[str, list[int]] = {}
    for trace in snapshot.traces:
        group = groups.setdefault(_origin([frame.filename for frame in trace.traceback]), [0, 0])
        group[0] += trace.size
        group[1] += 1
    rows = [{"origin": k, "mib": round(v[0] / 2**20, 2), "blocks": v[1]} for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r["mib"])


def run_real(steps: int, world: int, report: bool = True, breakdown: bool = False, trace: bool = True) -> dict:
    import elastictrain as et

    def train_fn(ctx):
        import torch

        model = ctx.prepare_model(torch.nn.Linear(2, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=steps):
            if report:
                ctx.report({"loss": 1.0 / (step + 1)})

    marks = [steps * i // 10 for i in range(1, 10)]
    samples: list[dict] = []

    def sample(step: int) -> None:
        samples.append({"step": step, "traced": tracemalloc.get_traced_memory()[0],
                        "tracemalloc_own": tracemalloc.get_tracemalloc_memory() if trace else 0, "rss": _rss()})

    class Sampler:
        def on_progress(self, view) -> None:
            while marks and view.step >= marks[0]:
                marks.pop(0)
                sample(view.step)

    began = time.monotonic()
    gc.collect()
    rss_before = _rss()
    if trace:
        tracemalloc.start(30 if breakdown else 1)
    result = et.ElasticTrainer(
        train_fn, scaling=et.ScalingConfig(min_workers=world, max_workers=world),
        batch=et.BatchConfig(global_batch_size=world, micro_batch_size=1), callbacks=[Sampler()],
    ).fit()
    current, peak = tracemalloc.get_traced_memory()
    rss_end = _rss()
    gc.collect()  # the driver's objects form a cycle (the callbacks' view refers to it); what is left is the Result's
    after_gc = tracemalloc.get_traced_memory()[0]
    groups = _breakdown(tracemalloc.take_snapshot()) if breakdown and trace else None
    tracemalloc.stop()
    mib = 2**20
    traced_slope = _slope([(s["step"], s["traced"]) for s in samples])
    figures = {
        "arm": "real", "steps": steps, "world": world, "reports": report, "traced": trace,
        "driver_mib": round(current / mib, 2), "driver_peak_mib": round(peak / mib, 2),
        "driver_after_gc_mib": round(after_gc / mib, 2),
        "bytes_per_step": round(current / steps, 1),
        "traced_slope_bytes_per_step": round(traced_slope, 1),
        "traced_fixed_mib": round((current - traced_slope * steps) / mib, 2),
        "reports_kept": len(result.history), "steps_done": result.steps, "wall_s": round(time.monotonic() - began, 1),
        "samples": samples,
    }
    if rss_before is not None and rss_end is not None:
        native = [(s["step"], s["rss"] - s["traced"] - s["tracemalloc_own"]) for s in samples]
        figures.update({
            "rss_before_mib": round(rss_before / mib, 1), "rss_end_mib": round(rss_end / mib, 1),
            "rss_slope_bytes_per_step": round(_slope([(s["step"], s["rss"]) for s in samples]), 1),
            "native_slope_bytes_per_step": round(_slope(native), 1),
        })
    if groups is not None:
        figures["end_breakdown"] = groups
    return figures


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("driver_memory", __doc__, repeats=1, quick={"steps": 10_000},
                               no_effect={"repeats": "one measurement", "seed": "nothing here is random"})
    parser.add_argument("--steps", type=int, default=100_000)
    C.add_workers_arg(parser, 4, help="ranks sending records")
    parser.add_argument("--failures", type=int, default=10, help="world changes spread over the run (records arm)")
    parser.add_argument("--real", action="store_true", help="run fit() on a local Ray cluster instead")
    parser.add_argument("--no-report", action="store_true", help="--real without ctx.report: the runtime's own growth")
    parser.add_argument("--breakdown", action="store_true", help="--real: group what is left at the end by origin")
    parser.add_argument("--no-trace", action="store_true", help="--real: RSS only, without tracemalloc")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with C.deadline(args.timeout):
        if args.real:
            figures = run_real(args.steps, min(args.workers, 2), report=not args.no_report, breakdown=args.breakdown,
                               trace=not args.no_trace)
        else:
            figures = run_records(args.steps, args.workers, args.failures)
    print(json.dumps(figures, indent=2))
    C.write_report(args.out, "driver_memory", figures,
                   "# Driver memory\n\n" + C.md_table(["figure", "value"], list(figures.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
