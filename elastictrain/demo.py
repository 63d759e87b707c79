"""`elastictrain demo`: the main job on an embedded local Ray cluster, with injected failures.

Trains the toy model with several workers, kills workers and the leader at
seeded random steps, and ends with a recovery report. Inside `ray job submit`
(RAY_ADDRESS set) it joins that cluster instead of starting one.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.demo_output import InjectedKills, explaining_injected_kills
from elastictrain.runtime.cluster import ensure_ray
from elastictrain.testing.faults import FaultSchedule, hold_for_whole_world, recovery_report
from elastictrain.testing.toy import ToyTask, make_train_fn, reference_params
from elastictrain.trainer import ElasticTrainer


def run_demo(args) -> int:
    import ray

    if args.workers < 2:
        raise ValueError(f"--workers {args.workers}: the demo needs at least 2 workers to survive a kill")
    if args.steps < 10:
        raise ValueError(f"--steps {args.steps}: use at least 10 so faults land mid-run")
    task = ToyTask(total_steps=args.steps, step_sleep_s=0.08, seed=args.seed)
    batch = BatchConfig(global_batch_size=48, micro_batch_size=4, seed=args.seed)
    schedule = FaultSchedule.random(total_steps=args.steps, count=args.faults, seed=args.seed, full_world=args.workers)
    kills = InjectedKills()
    with explaining_injected_kills(kills.pids):
        started_ray = ensure_ray(args.workers + 2)
        print(f"elastictrain demo: {args.workers} workers, {args.steps} steps, "
              f"faults at steps {[f.step for f in schedule.faults]} ({', '.join(f.target for f in schedule.faults)})",
              flush=True)
        began = time.time()
        try:
            result = ElasticTrainer(
                make_train_fn(task, on_step=hold_for_whole_world([f.step for f in schedule.faults], args.workers)),
                scaling=ScalingConfig(min_workers=max(1, args.workers - 1), max_workers=args.workers),
                batch=batch,
                checkpoint=CheckpointConfig(uri=args.checkpoint_uri, every_steps=10) if args.checkpoint_uri else None,
                failure=FailureConfig(collective_timeout_s=5, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0),
                run=RunConfig(progress=True, progress_total=args.steps, seed=args.seed),
                callbacks=[schedule, kills],
            ).fit()
        finally:
            if started_ray:
                ray.shutdown()  # stops Ray's thread that prints its error reports
    wall = time.time() - began
    rows = recovery_report(schedule, result)
    reference = reference_params(task, batch)
    if "params" not in result.metrics:
        raise RuntimeError(f"the run's final report (step {result.metrics.get('step')}) has no parameters: "
                           "a report of the last step was lost")
    drift = (torch.tensor(result.metrics["params"]) - reference).abs().max().item()
    report = {
        "steps": result.steps,
        "wall_s": wall,
        "faults": rows,
        "faults_scheduled": len(schedule.faults),
        "workers_lost": result.failures,
        "steps_redone": result.steps_redone,
        "steps_lost_in_flight": result.steps_lost_in_flight,
        "final_loss": result.metrics.get("loss"),
        "max_param_diff_vs_one_process": drift,
        "checkpoint_uri": result.checkpoint_uri,
    }
    _print_report(report)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if result.steps == args.steps and drift < 1e-4 and len(rows) == len(schedule.faults) else 1


def _print_report(report: dict) -> None:
    out = sys.stdout
    print("\nRecovery report", file=out)
    print(f"  steps trained      {report['steps']} in {report['wall_s']:.1f} s", file=out)
    print(f"  faults injected    {len(report['faults'])} of {report['faults_scheduled']}", file=out)
    print(f"  workers lost       {report['workers_lost']}", file=out)
    print(f"  steps redone       {report['steps_redone']} committed, {report['steps_lost_in_flight']} in flight", file=out)
    print(f"  final loss         {report['final_loss']:.4f}", file=out)
    print(f"  params vs 1-process run: max |diff| {report['max_param_diff_vs_one_process']:.2e}", file=out)
    print("  fault  step  killed     recovery   resumed at  redone", file=out)
    for i, row in enumerate(report["faults"], 1):
        rec = f"{row['recovery_s']:.3f} s" if row["recovery_s"] is not None else "n/a"
        print(f"  {i:>5}  {row['step']:>4}  {row['target']:<9}  {rec:>9}  {str(row['resumed_from']):>10}  "
              f"{str(row['steps_redone']):>6}", file=out)
    times = [r["recovery_s"] for r in report["faults"] if r["recovery_s"] is not None]
    if times:
        print(f"  median recovery    {statistics.median(times):.3f} s over {len(times)} faults", file=out)
