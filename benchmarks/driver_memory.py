"""Driver memory of a long run: what `fit()` keeps of its records, per step.

Two arms, measured in one process with tracemalloc (Python allocations):

- `records` (default, no Ray): the records a run of `--steps` steps on `--workers` ranks
  sends (a commit per rank per step, rank 0's metrics per step, an event per failure)
  folded into the driver's `RunLog`, against a plain list that keeps every record
  (what the driver kept before). Both are fed the same records.
- `--real`: an actual `ElasticTrainer.fit()` of `--steps` near-empty steps on a local
  Ray cluster, reporting each step's loss; traced on the driver from before `fit()`
  to after the Result is built (the Result's history, one report per step, included).

    python -m benchmarks driver_memory --steps 100000
    python -m benchmarks driver_memory --real --steps 100000
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc

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


def run_real(steps: int, world: int) -> dict:
    import elastictrain as et

    def train_fn(ctx):
        import torch

        model = ctx.prepare_model(torch.nn.Linear(2, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ctx.state(model=model, optimizer=opt)
        for step in ctx.steps(total_steps=steps):
            ctx.report({"loss": 1.0 / (step + 1)})

    began = time.monotonic()

    def fit():
        return et.ElasticTrainer(
            train_fn, scaling=et.ScalingConfig(min_workers=world, max_workers=world),
            batch=et.BatchConfig(global_batch_size=world, micro_batch_size=1),
        ).fit()

    mb, peak, result = _traced(fit)
    return {
        "arm": "real", "steps": steps, "world": world, "driver_mib": round(mb, 2), "driver_peak_mib": round(peak, 2),
        "bytes_per_step": round(mb * 2**20 / steps, 1), "reports_kept": len(result.history),
        "steps_done": result.steps, "wall_s": round(time.monotonic() - began, 1),
    }


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("driver_memory", __doc__, repeats=1, quick={"steps": 10_000},
                               no_effect={"repeats": "one measurement", "seed": "nothing here is random"})
    parser.add_argument("--steps", type=int, default=100_000)
    C.add_workers_arg(parser, 4, help="ranks sending records")
    parser.add_argument("--failures", type=int, default=10, help="world changes spread over the run (records arm)")
    parser.add_argument("--real", action="store_true", help="run fit() on a local Ray cluster instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with C.deadline(args.timeout):
        figures = (run_real(args.steps, min(args.workers, 2)) if args.real
                   else run_records(args.steps, args.workers, args.failures))
    print(json.dumps(figures, indent=2))
    C.write_report(args.out, "driver_memory", figures,
                   "# Driver memory\n\n" + C.md_table(["figure", "value"], list(figures.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
