"""Recovery benchmark: time from a worker's death to the next completed step.

The same job runs under each arm: a tiny seeded MLP on synthetic data, W workers
(default 3), S steps (default 60) slowed by a short sleep (default 50 ms) so that
the kill lands mid-run. Rank 1 SIGKILLs itself at the start of step K (default
25), once per run (a marker file records the kill time). Each process logs every
step whose optimizer update it applied, with its wall-clock time.

Figures of one run, identical for every arm:

- recovery_s: (first optimizer step completed by any process after the kill)
  minus (kill time);
- steps_redone: step indices whose update was applied before the kill and that
  were computed and applied again after it.

Arms:

- raytrain: Ray Train's TorchTrainer, FailureConfig(max_failures=3), a
  checkpoint every 10 steps through ray.train.report; restarts the worker group
  and resumes from the newest checkpoint;
- torchrun: `torchrun --max-restarts 3` with a c10d rendezvous on 127.0.0.1 and
  a checkpoint every 10 steps; restarts every rank and resumes from it;
- torchft / torchft-hb1s: torchft (lighthouse heartbeat timeout 5 s, its
  default, and 1 s), one replica group per worker; survivors continue;
- elastictrain: ElasticTrainer with min_workers=W-1, max_workers=W; the loop keeps its model and
  optimizer across re-entries (`ctx.keep`, the documented form);
- elastictrain-rebuild (opt-in): the same, in the older loop form that builds the model and optimizer
  on every entry of train_fn and loads the survivor's state into them;
- elastictrain-spares (added by `--spares N`): the same with `ScalingConfig(spares=N)`; the kill waits
  (bounded) until a spare waits outside the world.

The elastictrain arms also report full_size_s: from the kill to the first step committed by a world
of W members again (a spare fills the next world; without one, a new worker process starts and the
world grows at a step boundary). Runs need enough steps after the kill for that (say --steps 200).

The elastictrain arms also measure each survivor's peak memory (VmHWM, reset through
/proc/self/clear_refs) over the rebuild and its first step, against its peak over two steps
before the kill: `rebuild_peak_ratio`.

Each run is a child process in its own session with a hard deadline; the whole
process group is killed when it ends or overruns, and its temp dir is removed.

    python -m benchmarks recovery                       # all arms, 3 repeats
    python -m benchmarks recovery --repeats 1 --arms torchrun,torchft
    python -m benchmarks recovery --out bench-out/      # recovery.json, recovery.md
    python -m benchmarks recovery --quick               # elastictrain only, 1 repeat, 40 steps
    python -m benchmarks recovery --arms elastictrain --spares 1 --steps 200 --repeats 5   # with and without a spare
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import _common as C

ARMS = ["raytrain", "torchrun", "torchft", "torchft-hb1s", "elastictrain"]
OPT_IN_ARMS = ["torchrun-plain",  # hangs or fails on most restarts here (pytorch#135712)
               "elastictrain-rebuild",  # the older loop form, for comparison
               "elastictrain-spares"]  # warm spares; --spares N adds it
ARM_LABELS = {
    "torchrun-plain": "torchrun --max-restarts, default store (ckpt every 10)",
    "raytrain": "Ray Train TorchTrainer (ckpt every 10)",
    "torchrun": "torchrun --max-restarts, store per restart (ckpt every 10)",
    "torchft": "torchft 0.2.0, 5 s heartbeat timeout (default)",
    "torchft-hb1s": "torchft 0.2.0, 1 s heartbeat timeout",
    "elastictrain": "elastictrain ElasticTrainer",
    "elastictrain-rebuild": "elastictrain ElasticTrainer, model and optimizer built on every entry (older loop form)",
    "elastictrain-spares": "elastictrain ElasticTrainer with warm spares (ScalingConfig(spares=N))",
}
BASELINE = "raytrain"
QUICK = {"arms": "elastictrain", "repeats": 1, "steps": 40, "kill_step": 15, "timeout": 120.0}
QUICK_DEADLINE_S = 240
NOTES = """Notes:
- Ray Train (2.60, Train V2) collects `ray.train.report` results, checkpoints included, when its
  controller polls the workers (every 2 s by default, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a
  checkpoint reported less than one poll before a failure is not registered, so with ~50 ms
  steps the run resumes from the checkpoint before the last one (more steps redone than the
  10-step interval suggests).
- torchrun runs with a per-restart key prefix on the agent's store; with the default store the
  restarted gloo ranks dial the dead group's addresses and fail or hang (pytorch#135712); the
  `torchrun-plain` arm (opt-in) shows it.
- torchft runs one replica group per worker; the killed replica is not restarted, the survivors
  go on once the lighthouse drops it (heartbeat timeout), restoring nothing.
"""


# ---------------------------------------------------------------------------
# Arms, each run inside a child process (`--trial ARM --trial-dir DIR`)
# ---------------------------------------------------------------------------


def _write_status(trial_dir: Path, **status) -> None:
    (trial_dir / "status.json").write_text(json.dumps(status, default=str))


def trial_raytrain(a: argparse.Namespace, d: Path) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dict(
        log_dir=str(d / "steps"), marker=str(d / "killed.json"), ckpt_tmp=str(d / "ckpt-tmp"),
        steps=a.steps, kill_step=a.kill_step, kill_rank=a.kill_rank, step_sleep=a.step_sleep,
        ckpt_every=a.ckpt_every, global_batch=a.global_batch, micro_batch=a.micro_batch, seed=a.seed,
        hidden=a.hidden or None,
    )

    def train_loop(config: dict) -> None:
        import tempfile as _tempfile

        import torch
        import ray.train as rt
        import ray.train.torch as rtt

        from benchmarks import _common as CC

        CC.set_threads(1)
        ctx = rt.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        log = CC.StepLog(config["log_dir"], rank)
        data = CC.make_dataset("tiny", seed=config["seed"])
        model = rtt.prepare_model(CC.make_model("tiny", seed=config["seed"], hidden=config["hidden"]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        start = 0
        ckpt = rt.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as cd:
                state = torch.load(os.path.join(cd, "state.pt"), weights_only=True)
            model.module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["next_step"])
        G, m = config["global_batch"], config["micro_batch"]
        for step in range(start, config["steps"]):
            CC.maybe_kill(config["marker"], rank, step, config["kill_rank"], config["kill_step"])
            time.sleep(config["step_sleep"])
            opt.zero_grad(set_to_none=True)
            loss = CC.ddp_accumulate(model, CC.micro_batches(data, step, G, m, rank, world), G)
            opt.step()
            log.step(step)
            if (step + 1) % config["ckpt_every"] == 0:
                metrics = {"step": step, "loss": loss}
                if rank == 0:
                    os.makedirs(config["ckpt_tmp"], exist_ok=True)
                    with _tempfile.TemporaryDirectory(dir=config["ckpt_tmp"]) as td:
                        torch.save(
                            {"model": model.module.state_dict(), "optimizer": opt.state_dict(),
                             "next_step": step + 1},
                            os.path.join(td, "state.pt"),
                        )
                        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(td))
                else:
                    rt.report(metrics)
        log.close()

    ray.init(address="local", num_cpus=max(8, a.workers + 2), include_dashboard=False, log_to_driver=True)
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg,
            scaling_config=ray.train.ScalingConfig(num_workers=a.workers, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name="recovery", storage_path=str(d / "ray-storage"),
                failure_config=ray.train.FailureConfig(max_failures=3),
            ),
        )
        result = trainer.fit()
        _write_status(d, ok=result.error is None if hasattr(result, "error") else True)
    finally:
        ray.shutdown()


def trial_torchft(a: argparse.Namespace, d: Path, heartbeat_timeout_ms: int) -> None:
    port = C.free_port()
    lighthouse = subprocess.Popen(
        ["torchft_lighthouse", "--min_replicas", str(a.workers - 1), "--bind", f"[::]:{port}",
         "--heartbeat_timeout_ms", str(heartbeat_timeout_ms), "--join_timeout_ms", str(a.join_timeout_ms)],
        env=C.child_env(),
    )
    procs: list[subprocess.Popen] = []
    try:
        time.sleep(0.5)
        for rid in range(a.workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.baselines.torchft_train",
                 "--replica-id", str(rid), "--num-replicas", str(a.workers), "--min-replicas", str(a.workers - 1),
                 "--lighthouse", f"http://127.0.0.1:{port}", "--log-dir", str(d / "steps"),
                 "--marker", str(d / "killed.json"), "--steps", str(a.steps), "--kill-step", str(a.kill_step),
                 "--kill-rank", str(a.kill_rank), "--step-sleep", str(a.step_sleep),
                 "--global-batch", str(a.global_batch), "--micro-batch", str(a.micro_batch), "--seed", str(a.seed),
                 "--hidden", str(a.hidden)],
                env=C.child_env(), cwd=C.REPO_ROOT,
            ))
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        _write_status(d, ok=True, rcs=[p.poll() for p in procs])
    finally:
        for p in [*procs, lighthouse]:
            if p.poll() is None:
                p.terminate()
        for p in [*procs, lighthouse]:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def elastictrain_unavailable() -> str | None:
    """Why the elastictrain arm cannot run here, or None."""
    try:
        import elastictrain as et

        for name in ("ElasticTrainer", "ScalingConfig", "BatchConfig", "FailureConfig"):
            getattr(et, name)
    except Exception as e:  # the library is written in parallel; it may not be there yet
        return f"{type(e).__name__}: {e}"
    return None


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_memory(d: Path) -> dict:
    """Per survivor (a process that re-entered): peak RSS over the rebuild and its first step, and over two
    steps before the kill; the ratio of the two."""
    by_pid: dict[int, dict] = {}
    for path in sorted((d / "memory").glob("*.jsonl")) if (d / "memory").exists() else []:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            by_pid.setdefault(r["pid"], {})[r["kind"]] = r["hwm_kb"]
            if "reentry_s" in r:
                by_pid[r["pid"]]["reentry_s"] = r["reentry_s"]
    ratios = [m["rebuild"] / m["steady"] for m in by_pid.values() if m.get("rebuild") and m.get("steady")]
    reentries = [m["reentry_s"] for m in by_pid.values() if "reentry_s" in m]
    return {"memory": list(by_pid.values()), "rebuild_peak_ratio": max(ratios) if ratios else None,
            "reentry_s": max(reentries) if reentries else None}


def wait_for_a_spare(ctx, timeout_s: float = 60.0) -> bool:
    """Hold this rank until a live worker waits outside its world (a warm spare), bounded; every rank polls
    the same store, so they all go on together."""
    runner, members = ctx._session.runner, set(ctx._session.world.plan.members)
    lapse = runner.spec.failure.heartbeat_timeout_s
    deadline = time.monotonic() + timeout_s
    while not runner.election.live_ids(lapse) - members:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def back_to_full_size(events: list[dict] | None, kill: dict | None, workers: int) -> float | None:
    """Seconds from the kill to the first step committed by a world of `workers` members after it (the
    library's `recovered` event of that world), or None."""
    if not events or not kill:
        return None
    full = [e["time"] for e in events if e.get("kind") == "recovered" and e.get("world_size") == workers
            and e["time"] > kill["t"]]
    return min(full) - kill["t"] if full else None


def trial_elastictrain(a: argparse.Namespace, d: Path, keep_objects: bool = True, spares: int = 0) -> None:
    why = elastictrain_unavailable()
    if why:
        _write_status(d, unavailable=why)
        return
    import ray

    import elastictrain as et

    log_dir, marker = str(d / "steps"), str(d / "killed.json")
    steps, kill_step, kill_rank, sleep, seed = a.steps, a.kill_step, a.kill_rank, a.step_sleep, a.seed
    hidden = a.hidden or None
    ddp_kwargs = {"init_sync": True} if a.ddp_init_sync else {}
    memory_dir = d / "memory"
    memory_dir.mkdir(exist_ok=True)
    entries: list[int] = []  # this worker process's entries of train_fn

    def note_memory(kind: str, **extra) -> None:
        with open(memory_dir / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "kind": kind, "hwm_kb": _memory_kb("VmHWM"),
                                "rss_kb": _memory_kb("VmRSS"), **extra}) + "\n")

    def train_fn(ctx) -> None:
        import torch

        from benchmarks import _common as CC

        entered = time.perf_counter()
        CC.set_threads(1)
        entries.append(ctx.term)
        log = CC.StepLog(log_dir, ctx.rank, attempt=getattr(ctx, "term", None))
        first_step_of_reentry = len(entries) > 1
        try:
            data = CC.make_dataset("tiny", seed=seed)
            if keep_objects:
                net = ctx.keep("net", lambda: CC.make_model("tiny", seed=seed, hidden=hidden))
                model = ctx.prepare_model(net, **ddp_kwargs)
                opt = ctx.keep("opt", lambda: torch.optim.AdamW(net.parameters(), lr=1e-3))
            else:
                model = ctx.prepare_model(CC.make_model("tiny", seed=seed, hidden=hidden), **ddp_kwargs)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ctx.state(model=model, optimizer=opt)
            reentry_s = time.perf_counter() - entered  # build (or keep) the objects, wrap, restore
            for step in ctx.steps(total_steps=steps):
                if spares and step == kill_step and ctx.term == 1:
                    wait_for_a_spare(ctx)  # the kill lands while a spare waits, however slowly it started
                CC.maybe_kill(marker, ctx.rank, step, kill_rank, kill_step)
                if step == kill_step - 2 and not first_step_of_reentry:
                    _reset_peak_memory()  # steady state: the peak over two whole steps before the kill
                time.sleep(sleep)
                with ctx.accumulate(model, opt) as acc:
                    for batch in ctx.micro_batches(data, step):
                        loss, n = CC.loss_sum(model, batch)
                        acc.backward(loss, num_items=n)
                log.step(step)
                if step == kill_step - 1 and len(entries) == 1:
                    note_memory("steady")
                if first_step_of_reentry:
                    first_step_of_reentry = False
                    note_memory("rebuild", reentry_s=reentry_s)  # the peak since the world changed: rebuild, re-entry, one step
                ctx.report({"step": step, "t": time.time(), "loss": float(acc.loss)})
        except BaseException:
            _reset_peak_memory()  # the world changed (or the run failed): from here on is the rebuild
            raise
        finally:
            log.close()

    ray.init(address="local", num_cpus=max(8, a.workers + spares + 2), include_dashboard=False, log_to_driver=True)
    try:
        result = et.ElasticTrainer(
            train_fn,
            scaling=et.ScalingConfig(min_workers=a.workers - 1, max_workers=a.workers, spares=spares,
                                     resources_per_worker={"CPU": 1}),
            batch=et.BatchConfig(global_batch_size=a.global_batch, micro_batch_size=a.micro_batch),
            failure=et.FailureConfig(max_failures=3),
        ).fit()
        extra = {}
        for name in ("recoveries", "steps_redone"):  # the library's own view, kept next to ours
            try:
                extra[f"reported_{name}"] = getattr(result, name)
            except Exception as e:  # noqa: BLE001
                extra[f"reported_{name}"] = f"unavailable: {e}"
        _write_status(
            d, ok=True, steps=getattr(result, "steps", None), metrics=getattr(result, "metrics", None),
            events=getattr(result, "events", None), **extra,
        )
    finally:
        ray.shutdown()


def run_trial_child(a: argparse.Namespace) -> int:
    d = Path(a.trial_dir)
    try:
        if a.trial == "raytrain":
            trial_raytrain(a, d)
        elif a.trial == "torchft":
            trial_torchft(a, d, 5000)
        elif a.trial == "torchft-hb1s":
            trial_torchft(a, d, 1000)
        elif a.trial == "elastictrain":
            trial_elastictrain(a, d)
        elif a.trial == "elastictrain-rebuild":
            trial_elastictrain(a, d, keep_objects=False)
        elif a.trial == "elastictrain-spares":
            trial_elastictrain(a, d, spares=a.spares)
        else:
            raise SystemExit(f"unknown arm {a.trial!r}")
    except Exception as e:
        _write_status(d, ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def trial_args(a: argparse.Namespace) -> list[str]:
    return [
        "--steps", str(a.steps), "--kill-step", str(a.kill_step), "--kill-rank", str(a.kill_rank),
        "--step-sleep", str(a.step_sleep), "--workers", str(a.workers), "--ckpt-every", str(a.ckpt_every),
        "--global-batch", str(a.global_batch), "--micro-batch", str(a.micro_batch),
        "--timeout", str(a.timeout), "--join-timeout-ms", str(a.join_timeout_ms), "--seed", str(a.seed),
        "--hidden", str(a.hidden), *(["--ddp-init-sync"] if a.ddp_init_sync else []),
        "--spares", str(a.spares),
    ]


def unavailable(arm: str) -> str | None:
    if arm.startswith("torchft"):
        if importlib.util.find_spec("torchft") is None:
            return "torchft is not installed (pip install torchft==0.2.0)"
        if shutil.which("torchft_lighthouse") is None:
            return "torchft_lighthouse is not on PATH"
    if arm == "raytrain":
        try:
            import ray.train  # noqa: F401
        except Exception as e:
            return f"ray.train unavailable ({e}); pip install 'ray[train]'"
    if arm.startswith("torchrun") and shutil.which("torchrun") is None:
        return "torchrun is not on PATH"
    if arm.startswith("elastictrain"):
        return elastictrain_unavailable()
    return None


def run_one(arm: str, a: argparse.Namespace, keep: bool) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"recovery-{arm}-"))
    (d / "steps").mkdir()
    log_path = d / "output.log"
    try:
        if arm.startswith("torchrun"):
            cmd = [
                "torchrun", "--nnodes", "1", "--nproc-per-node", str(a.workers), "--max-restarts", "3",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{C.free_port()}",
                "--rdzv-id", f"recovery-{os.getpid()}-{time.time_ns()}",
                "--module", "benchmarks.baselines.torchrun_train",
                "--log-dir", str(d / "steps"), "--marker", str(d / "killed.json"), "--ckpt-dir", str(d),
                "--steps", str(a.steps), "--kill-step", str(a.kill_step), "--kill-rank", str(a.kill_rank),
                "--ckpt-every", str(a.ckpt_every), "--step-sleep", str(a.step_sleep),
                "--global-batch", str(a.global_batch), "--micro-batch", str(a.micro_batch), "--seed", str(a.seed),
            ] + (["--store-per-restart"] if arm == "torchrun" else [])
        else:
            cmd = [sys.executable, "-m", "benchmarks.recovery", "--trial", arm, "--trial-dir", str(d), *trial_args(a)]
        run = C.run_child(cmd, timeout_s=a.timeout + 30, log_path=log_path)
        status = {}
        if (d / "status.json").exists():
            status = json.loads((d / "status.json").read_text())
        if status.get("unavailable"):
            return {"arm": arm, "unavailable": status["unavailable"]}
        records, kill = C.read_step_logs(d / "steps"), C.read_kill(d / "killed.json")
        rec = C.analyse_recovery(records, kill, a.steps)
        rec.update(kill_t=kill["t"] if kill else None, step_s=C.step_gap(records, kill["t"] if kill else None))
        rec.update(arm=arm, rc=run["rc"], timed_out=run["timed_out"], wall_s=round(run["wall_s"], 2))
        rec["ok"] = bool(rec["killed"] and rec["recovery_s"] is not None and rec["completed"] and not run["timed_out"])
        for key in ("events", "reported_recoveries", "reported_steps_redone"):
            if status.get(key) is not None:
                rec[key] = status[key]
        if arm.startswith("elastictrain"):
            rec.update(read_memory(d))
            rec["full_size_s"] = back_to_full_size(status.get("events"), C.read_kill(d / "killed.json"), a.workers)
            rec["spares_joined"] = sum(1 for e in status.get("events") or [] if e.get("kind") == "spare_joined")
        if status.get("error"):
            rec["error"] = status["error"]
        if not rec["ok"]:
            rec["log_tail"] = C.tail(log_path, 3000)
            if status.get("traceback"):
                rec["traceback"] = status["traceback"]
        return rec
    finally:
        if keep:
            print(f"  kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def summarise(arm: str, runs: list[dict], base_median: float | None) -> dict:
    ok = [r for r in runs if r.get("ok")]
    med_rec = C.median(r["recovery_s"] for r in ok)
    med_redo = C.median(r["steps_redone"] for r in ok)
    return {
        "arm": arm,
        "label": ARM_LABELS[arm],
        "n": len(runs),
        "n_ok": len(ok),
        "recovery_s_median": med_rec,
        "recovery_s_all": [r.get("recovery_s") for r in runs],
        "steps_redone_median": med_redo,
        "steps_redone_all": [r.get("steps_redone") for r in runs],
        "steps_redone_total_all": [r.get("steps_redone_total") for r in runs],
        "speedup_vs_raytrain": (base_median / med_rec) if (base_median and med_rec) else None,
        "rebuild_peak_ratio_median": C.median(r["rebuild_peak_ratio"] for r in ok if r.get("rebuild_peak_ratio")),
        "rebuild_peak_ratio_all": [r.get("rebuild_peak_ratio") for r in runs],
        "reentry_s_median": C.median(r.get("reentry_s") for r in ok),
        "reentry_s_all": [r.get("reentry_s") for r in runs],
        "full_size_s_median": C.median(r.get("full_size_s") for r in ok),
        "full_size_s_all": [r.get("full_size_s") for r in runs],
        "failures": [
            {k: r.get(k) for k in ("rc", "timed_out", "error", "completed", "recovery_s")} for r in runs if not r.get("ok")
        ],
    }


def build_parser() -> C.BenchmarkParser:
    p = C.BenchmarkParser("recovery", __doc__, repeats=3, timeout=180.0, quick=QUICK,
                          help={"timeout": "deadline of one run in seconds (default: 180)"})
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-step", type=int, default=25)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.05, help="seconds slept in each step")
    C.add_workers_arg(p, 3)
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint interval of the restart-based arms")
    p.add_argument("--global-batch", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--join-timeout-ms", type=int, default=60000, help="torchft lighthouse join timeout")
    p.add_argument("--keep", action="store_true", help="keep each run's temp dir (logs) for inspection")
    p.add_argument("--hidden", type=int, default=0, help="width of the MLP's hidden layers, every arm "
                   "(about 2*hidden**2 parameters; 0: the tiny model's 64)")
    p.add_argument("--sizes", default="", help="recovery against model size (benchmarks/_recovery_sizes.py): "
                   "comma-separated parameter counts, e.g. 1M,10M,100M,250M; 2 workers")
    p.add_argument("--after-kill-s", type=float, default=15.0, help="with --sizes: seconds of training after "
                   "the kill (the step count follows from a measured step at each size)")
    p.add_argument("--faults", default="follower,leader", help="with --sizes: which rank is killed, "
                   "follower (rank 1) and/or leader (rank 0)")
    p.add_argument("--ddp-init-sync", action="store_true", help="elastictrain arm: DDP's constructor broadcasts "
                   "the parameters, as before survivors compared fingerprints instead")
    p.add_argument("--spares", type=int, default=0, help="add the elastictrain-spares arm: elastictrain with "
                   "ScalingConfig(spares=N), interleaved with the others; compare full_size_s")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    p.add_argument("--trial-dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.trial:
        return run_trial_child(a)

    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS + OPT_IN_ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from {ARMS + OPT_IN_ARMS}")
    if not 0 < a.kill_step < a.steps:
        p.error("--kill-step must lie inside the run")
    if a.spares < 0:
        p.error("--spares must be 0 or more")
    if a.spares and "elastictrain-spares" not in arms:
        arms.append("elastictrain-spares")
    if "elastictrain-spares" in arms and not a.spares:
        p.error("the elastictrain-spares arm needs --spares N (N >= 1)")
    if a.sizes:
        from benchmarks._recovery_sizes import run_sizes

        skipped = {arm: why for arm in arms if (why := unavailable(arm))}
        for arm, why in skipped.items():
            print(f"[skip] {arm}: {why}")
        a.arms = ",".join(arm for arm in arms if arm not in skipped)
        return run_sizes(a, argv, run_one)

    skipped = {arm: why for arm in arms if (why := unavailable(arm))}
    for arm, why in skipped.items():
        print(f"[skip] {arm}: {why}")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms if arm not in skipped}
    t_start = time.time()
    for rep in range(a.repeats):
        for arm in list(runs):  # interleaved, so slow drift of the machine hits every arm alike
            if arm in skipped:
                continue
            print(f"[run] {arm} repeat {rep + 1}/{a.repeats} ...", flush=True)
            r = run_one(arm, a, a.keep)
            if r.get("unavailable"):
                skipped[arm] = r["unavailable"]
                print(f"[skip] {arm}: {r['unavailable']}")
                continue
            runs[arm].append(r)
            print(
                f"      ok={r['ok']} recovery={C.fmt(r.get('recovery_s'), 3, ' s')} redone={r.get('steps_redone')} "
                f"rebuild_peak_ratio={C.fmt(r.get('rebuild_peak_ratio'), 3)} reentry={C.fmt(r.get('reentry_s'), 3, ' s')} "
                f"full_size={C.fmt(r.get('full_size_s'), 3, ' s')} "
                f"first_after={r.get('first_step_after_kill')} wall={r['wall_s']} s rc={r['rc']}"
                + (" TIMEOUT" if r["timed_out"] else ""),
                flush=True,
            )
    runs = {arm: rs for arm, rs in runs.items() if arm not in skipped}

    base = None
    if BASELINE in runs:
        base = summarise(BASELINE, runs[BASELINE], None)["recovery_s_median"]
    summary = {arm: summarise(arm, rs, base) for arm, rs in runs.items()}

    targets = {}
    et_s = summary.get("elastictrain")
    if et_s and et_s["n_ok"]:
        ft = summary.get("torchft")
        targets = {
            "recovery >= 5x faster than Ray Train": (
                None if et_s["speedup_vs_raytrain"] is None else et_s["speedup_vs_raytrain"] >= 5.0
            ),
            "recovery faster than torchft (default heartbeat)": (
                None if not (ft and ft["recovery_s_median"]) else et_s["recovery_s_median"] < ft["recovery_s_median"]
            ),
            "<= 1 step redone": et_s["steps_redone_median"] <= 1,
        }
    sp_s = summary.get("elastictrain-spares")
    if sp_s and sp_s["n_ok"]:
        targets["back to full size within 0.5 s with a spare"] = (
            None if sp_s["full_size_s_median"] is None else sp_s["full_size_s_median"] <= 0.5
        )

    params = {k: v for k, v in vars(a).items() if k not in ("trial", "trial_dir", "keep")}
    data = {
        "benchmark": "recovery",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "command": C.command_line("recovery", argv),
        "params": params,
        "machine": C.machine_info(),
        "definitions": {
            "recovery_s": "first optimizer step completed by any process after the kill, minus the kill time",
            "steps_redone": "step indices applied before the kill and computed and applied again after it",
            "steps_redone_total": "step indices applied more than once for any reason (extra failures included)",
            "rebuild_peak_ratio": "elastictrain arms: a survivor's peak RSS from the world change through its first "
                                  "step after it, over its peak RSS across two steps before the kill (highest survivor)",
            "reentry_s": "elastictrain arms: a survivor's time from entering train_fn again to ctx.state returning "
                         "(objects built or kept, DDP wrap, restore); the slowest survivor",
            "full_size_s": "elastictrain arms: from the kill to the first step committed by a world of --workers "
                           "members again (the `recovered` event of that world)",
        },
        "summary": summary,
        "targets": targets,
        "skipped": skipped,
        "runs": runs,
    }
    rows = []
    for arm, s in summary.items():
        rows.append([
            s["label"], f"{s['n_ok']}/{s['n']}", C.fmt(s["recovery_s_median"], 2, " s"),
            C.fmt(s["steps_redone_median"], 1), C.fmt(s["speedup_vs_raytrain"], 1, "x"),
            ", ".join(C.fmt(x, 2) for x in s["recovery_s_all"]),
            C.fmt(s["rebuild_peak_ratio_median"], 2, "x"), C.fmt(s["reentry_s_median"], 3, " s"),
            C.fmt(s["full_size_s_median"], 2, " s"),
        ])
    md = [
        "# Recovery after a worker's SIGKILL\n",
        f"{a.workers} workers, {a.steps} steps of ~{a.step_sleep * 1000:.0f} ms + compute, rank {a.kill_rank} killed at "
        f"step {a.kill_step}; medians over {a.repeats} repeat(s). Machine: {data['machine']['cpus']} CPUs, "
        f"torch {data['machine']['torch']}, ray {data['machine']['ray']}, torchft {data['machine']['torchft']}.\n",
        "recovery = first step completed after the kill - kill time; "
        "steps redone = steps applied before the kill and applied again after it.\n",
        C.md_table(["arm", "ok/runs", "recovery (median)", "steps redone (median)", "speed-up vs Ray Train",
                    "recovery, each run (s)", "survivor's peak memory, rebuild / steady", "survivor's re-entry to ctx.state",
                    "back to full size (median)"], rows),
    ]
    if targets:
        md.append("\nTargets (elastictrain):\n")
        for k, v in targets.items():
            md.append(f"- {k}: {'met' if v else ('n/a' if v is None else 'NOT met')}\n")
    md.append(NOTES)
    if skipped:
        md.append("\nSkipped:\n")
        for k, v in skipped.items():
            md.append(f"- {k}: {v}\n")
    md.append(f"\nCommand: `{data['command']}`\n")
    jp, mp = C.write_report(a.out, "recovery", data, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
