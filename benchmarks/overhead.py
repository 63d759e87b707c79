"""Overhead benchmark: steps/s under elastictrain vs a plain torch DDP loop, nothing failing.

The same model (an MLP of 2.4 M parameters), the same global batch in the same
micro-batches, the same number of workers (default 2), the same number of steps, in
the same run:

- ddp: a plain DDP loop launched with `torchrun --standalone` (no Ray);
- elastictrain: ElasticTrainer with min_workers = max_workers = --workers,
  the loop written with ctx.steps / ctx.accumulate / ctx.micro_batches and a
  ctx.report per step, as the README shows;
- elastictrain_ddp_loop: the same runtime running the ddp arm's own hand-written
  loop (ctx.steps around it), which isolates what the failure machinery costs
  from what the accumulator's exact normalisation costs;
- ddp_ray_idle: the ddp arm again, while an idle local Ray cluster of the same shape
  (its daemons and --workers idle actors of 1 CPU) is up: what Ray's own processes
  cost on the machine, to tell from what the runtime costs.

Start-up is excluded: rank 0 times steps [warmup, steps) with time.perf_counter
inside the loop. Each step is some tens of milliseconds of real compute per
worker on one thread, so the comparison means something on a small machine.
Arms are interleaved over the repeats; the report gives medians and the ratio
elastictrain / ddp (target: within 1%).

    python -m benchmarks overhead                  # 3 repeats
    python -m benchmarks overhead --repeats 1 --steps 40
    python -m benchmarks overhead --quick          # 1 repeat, 40 steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _common as C

ARMS = ["ddp", "elastictrain", "elastictrain_ddp_loop", "ddp_ray_idle"]
ARM_LABELS = {
    "ddp": "torch DDP under torchrun",
    "elastictrain": "elastictrain ElasticTrainer",
    "elastictrain_ddp_loop": "elastictrain runtime, the ddp arm's loop",
    "ddp_ray_idle": "torch DDP under torchrun, idle Ray cluster up",
}
RAY_READY_S = 120.0
TARGET = 0.01
QUICK = {"repeats": 1, "steps": 40, "warmup": 5, "timeout": 120.0}
QUICK_DEADLINE_S = 300


def trial_elastictrain(a: argparse.Namespace, out_file: Path, hand_loop: bool = False) -> None:
    from benchmarks.recovery import elastictrain_unavailable

    why = elastictrain_unavailable()
    if why:
        out_file.write_text(json.dumps({"unavailable": why}))
        return
    import ray

    import elastictrain as et

    steps, warmup, out = a.steps, a.warmup, str(out_file)
    a_global, a_micro, seed = a.global_batch, a.micro_batch, a.seed

    def train_fn(ctx) -> None:
        import torch

        from benchmarks import _common as CC

        CC.set_threads(1)
        data = CC.make_dataset("work", seed=seed)
        model = ctx.prepare_model(CC.make_model("work", seed=seed))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctx.state(model=model, optimizer=opt)
        times = []
        t_start = None
        for step in ctx.steps(total_steps=steps):
            t0 = time.perf_counter()
            if step == warmup:
                t_start = t0
            items = mbs = 0
            if hand_loop:
                opt.zero_grad(set_to_none=True)
                batches = CC.micro_batches(data, step, a_global, a_micro, ctx.rank, ctx.world_size)
                loss = CC.ddp_accumulate(model, batches, a_global)
                opt.step()
                items, mbs = sum(len(b[0]) for b in batches), len(batches)
            else:
                with ctx.accumulate(model, opt) as acc:
                    for batch in ctx.micro_batches(data, step):
                        loss, n = CC.loss_sum(model, batch)
                        acc.backward(loss, num_items=n)
                        items, mbs = items + n, mbs + 1
                loss = acc.loss
            ctx.report({"loss": float(loss)})
            times.append(time.perf_counter() - t0)
        t_end = time.perf_counter()
        if ctx.rank == 0 and t_start is not None:
            timed = steps - warmup
            Path(out).write_text(json.dumps({
                "steps_per_s": timed / (t_end - t_start),
                "median_step_s": CC.median(times[-timed:]),
                "timed_steps": timed,
                "world_size": ctx.world_size,
                "rank0_items_per_step": items,
                "rank0_micro_batches_per_step": mbs,
            }))

    ray.init(address="local", num_cpus=max(8, a.workers + 2), include_dashboard=False, log_to_driver=True)
    try:
        et.ElasticTrainer(
            train_fn,
            scaling=et.ScalingConfig(min_workers=a.workers, max_workers=a.workers, resources_per_worker={"CPU": 1}),
            batch=et.BatchConfig(global_batch_size=a.global_batch, micro_batch_size=a.micro_batch),
        ).fit()
    finally:
        ray.shutdown()


def idle_ray_cluster(a: argparse.Namespace, ready_file: Path) -> None:
    """Hold a local Ray cluster of the elastictrain arms' shape, with --workers idle actors, until stdin closes."""
    import ray

    @ray.remote(num_cpus=1)
    class Idle:
        def ping(self) -> bool:
            return True

    ray.init(address="local", num_cpus=max(8, a.workers + 2), include_dashboard=False, log_to_driver=False)
    try:
        actors = [Idle.remote() for _ in range(a.workers)]
        ray.get([x.ping.remote() for x in actors], timeout=RAY_READY_S)
        ready_file.write_text("ready")
        sys.stdin.read()  # until the benchmark closes the pipe
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_cluster_up(a: argparse.Namespace, d: Path):
    """An idle Ray cluster in a child process for the duration of the block (ddp_ray_idle)."""
    ready = d / "ray-ready"
    with open(d / "ray.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.overhead", "--trial", "ray_idle", "--trial-out",
                                 str(ready), "--workers", str(a.workers)], stdin=subprocess.PIPE, stdout=log,
                                stderr=subprocess.STDOUT, env=C.child_env(), cwd=C.REPO_ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + RAY_READY_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"the idle Ray cluster did not come up: {C.tail(d / 'ray.log', 1500)}")
            time.sleep(0.2)
        yield
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        C.kill_group(proc.pid, grace_s=1.0)
        if proc.poll() is None:
            proc.wait()


def run_one(arm: str, a: argparse.Namespace) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"overhead-{arm}-"))
    out_file, log_path = d / "result.json", d / "output.log"
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--global-batch", str(a.global_batch),
              "--micro-batch", str(a.micro_batch), "--seed", str(a.seed)]
    try:
        if arm in ("ddp", "ddp_ray_idle"):
            cmd = ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(a.workers),
                   "--module", "benchmarks.baselines.ddp_overhead", "--out-file", str(out_file), *common]
        else:
            cmd = [sys.executable, "-m", "benchmarks.overhead", "--trial", arm, "--trial-out", str(out_file),
                   "--workers", str(a.workers), *common]
        with ray_cluster_up(a, d) if arm == "ddp_ray_idle" else contextlib.nullcontext():
            run = C.run_child(cmd, timeout_s=a.timeout, log_path=log_path)
        res = json.loads(out_file.read_text()) if out_file.exists() else {}
        if res.get("unavailable"):
            return {"arm": arm, "unavailable": res["unavailable"]}
        res.update(arm=arm, rc=run["rc"], timed_out=run["timed_out"], wall_s=round(run["wall_s"], 2))
        res["ok"] = "steps_per_s" in res and run["rc"] == 0 and not run["timed_out"]
        if not res["ok"]:
            res["log_tail"] = C.tail(log_path, 3000)
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


def build_parser() -> C.BenchmarkParser:
    p = C.BenchmarkParser("overhead", __doc__, repeats=3, timeout=300.0, quick=QUICK,
                          help={"timeout": "deadline of one run in seconds (default: 300)"})
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    C.add_workers_arg(p, 2)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--trial", help=argparse.SUPPRESS)
    p.add_argument("--trial-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.trial == "ray_idle":
        idle_ray_cluster(a, Path(a.trial_out))
        return 0
    if a.trial:
        trial_elastictrain(a, Path(a.trial_out), hand_loop=a.trial == "elastictrain_ddp_loop")
        return 0
    if a.warmup >= a.steps:
        p.error("--warmup must be below --steps")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if any(x not in ARMS for x in arms):
        p.error(f"choose arms from {ARMS}")

    skipped: dict[str, str] = {}
    if any(x.startswith("elastictrain") for x in arms):
        from benchmarks.recovery import elastictrain_unavailable

        why = elastictrain_unavailable()
        if why:
            for x in arms:
                if x.startswith("elastictrain"):
                    skipped[x] = why
            print(f"[skip] elastictrain: {why}")
    if shutil.which("torchrun") is None:
        skipped.update({x: "torchrun is not on PATH" for x in ("ddp", "ddp_ray_idle") if x in arms})
    if "ddp_ray_idle" in arms and "ddp_ray_idle" not in skipped:
        try:
            import ray  # noqa: F401
        except ImportError:
            skipped["ddp_ray_idle"] = "ray is not installed"
    runs: dict[str, list[dict]] = {x: [] for x in arms if x not in skipped}
    t_start = time.time()
    for rep in range(a.repeats):
        for arm in list(runs):
            if arm in skipped:
                continue
            print(f"[run] {arm} repeat {rep + 1}/{a.repeats} ...", flush=True)
            r = run_one(arm, a)
            if r.get("unavailable"):
                skipped[arm] = r["unavailable"]
                continue
            runs[arm].append(r)
            print(f"      ok={r['ok']} steps/s={C.fmt(r.get('steps_per_s'), 2)} items={r.get('rank0_items_per_step')}/{r.get('rank0_micro_batches_per_step')} "
                  f"median step={C.fmt((r.get('median_step_s') or 0) * 1000, 1, ' ms')} wall={r['wall_s']} s", flush=True)
    runs = {k: v for k, v in runs.items() if k not in skipped}

    summary = {}
    for arm, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        summary[arm] = {
            "arm": arm, "label": ARM_LABELS[arm], "n": len(rs), "n_ok": len(ok),
            "steps_per_s_median": C.median(r["steps_per_s"] for r in ok),
            "steps_per_s_all": [r.get("steps_per_s") for r in rs],
            "median_step_ms": C.median(r["median_step_s"] * 1000 for r in ok),
        }
    ratio = None
    if summary.get("ddp", {}).get("steps_per_s_median") and summary.get("elastictrain", {}).get("steps_per_s_median"):
        ratio = summary["elastictrain"]["steps_per_s_median"] / summary["ddp"]["steps_per_s_median"]
    target_met = None if ratio is None else ratio >= 1.0 - TARGET
    ratio_runtime = None
    if summary.get("ddp", {}).get("steps_per_s_median") and summary.get("elastictrain_ddp_loop", {}).get("steps_per_s_median"):
        ratio_runtime = summary["elastictrain_ddp_loop"]["steps_per_s_median"] / summary["ddp"]["steps_per_s_median"]

    ratio_ray_idle = None
    if summary.get("ddp", {}).get("steps_per_s_median") and summary.get("ddp_ray_idle", {}).get("steps_per_s_median"):
        ratio_ray_idle = summary["ddp_ray_idle"]["steps_per_s_median"] / summary["ddp"]["steps_per_s_median"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    data = {
        "benchmark": "overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "command": C.command_line("overhead", argv),
        "params": {k: v for k, v in vars(a).items() if k not in ("trial", "trial_out")},
        "machine": C.machine_info(),
        "summary": summary,
        "ratio_elastictrain_over_ddp": ratio,
        "ratio_runtime_with_ddp_loop_over_ddp": ratio_runtime,
        "ratio_ddp_with_idle_ray_over_ddp": ratio_ray_idle,
        "load_average_at_end": load,
        "target": f"elastictrain steps/s within {TARGET:.0%} of DDP",
        "target_met": target_met,
        "skipped": skipped,
        "runs": runs,
    }
    rows = [[s["label"], f"{s['n_ok']}/{s['n']}", C.fmt(s["steps_per_s_median"], 2), C.fmt(s["median_step_ms"], 1),
             ", ".join(C.fmt(x, 2) for x in s["steps_per_s_all"])] for s in summary.values()]
    md = [
        "# Steady-state overhead, nothing failing\n",
        f"World size {a.workers}, {a.steps} steps (timed: steps {a.warmup}..{a.steps - 1} on rank 0), global batch "
        f"{a.global_batch} in micro-batches of {a.micro_batch}, MLP of 2.4 M parameters, one thread per worker; "
        f"medians over {a.repeats} repeat(s). Machine: {data['machine']['cpus']} CPUs, torch {data['machine']['torch']}, "
        f"ray {data['machine']['ray']}.\n",
        C.md_table(["arm", "ok/runs", "steps/s (median)", "step time (median ms)", "steps/s, each run"], rows),
        f"\nelastictrain / DDP steps/s: {C.fmt(ratio, 3)} "
        f"(target >= {1 - TARGET:.2f}: {'met' if target_met else ('n/a' if target_met is None else 'NOT met')})\n",
        f"\nelastictrain runtime with the ddp arm's own loop / DDP steps/s: {C.fmt(ratio_runtime, 3)} "
        "(the failure machinery alone, without the accumulator's exact normalisation)\n",
        f"\nDDP with an idle Ray cluster up / DDP steps/s: {C.fmt(ratio_ray_idle, 3)} (what Ray's own processes cost)\n",
        f"\nLoad average at the end (1, 5, 15 min): {', '.join(C.fmt(x, 2) for x in load) if load else 'n/a'}\n",
    ]
    if skipped:
        md.append("\nSkipped:\n" + "".join(f"- {k}: {v}\n" for k, v in skipped.items()))
    md.append(f"\nCommand: `{data['command']}`\n")
    jp, mp = C.write_report(a.out, "overhead", data, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
