"""`elastictrain bench`: a short run of every benchmark, each a subprocess from the source tree.

The benchmarks live in the repository's `benchmarks/` folder, next to the
package; an install without the sources has none and the command says so.
Each benchmark writes its JSON and Markdown report (and the resume-rate run
its plot) to the output folder; this command adds `bench.json` and `bench.md`
with what ran, how long it took and whether it passed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# name -> (module, short-mode arguments, deadline in seconds)
SHORT_RUNS: dict[str, tuple[str, list[str], float]] = {
    "recovery": ("benchmarks.recovery", ["--arms", "elastictrain", "--repeats", "1", "--steps", "40",
                                         "--kill-step", "15", "--timeout", "120"], 240),
    "overhead": ("benchmarks.overhead", ["--repeats", "1", "--steps", "40", "--warmup", "5", "--timeout", "120"], 300),
    "accumulate": ("benchmarks.accumulate", ["--rounds", "3", "--micro-steps", "4"], 300),
    "checkpoint": ("benchmarks.checkpoint", ["--size-mb", "64", "--s3-size-mb", "0", "--repeats", "1"], 300),
    "resume_rate": ("benchmarks.resume_rate", ["--quick"], 240),
}


class BenchError(OSError):
    """The benchmarks cannot be found or run."""


def benchmarks_dir() -> Path:
    """The source tree's `benchmarks/` folder, found relative to the package."""
    import elastictrain

    folder = Path(elastictrain.__file__).resolve().parent.parent / "benchmarks"
    if not (folder / "_common.py").is_file():
        raise BenchError(f"no benchmarks folder at {folder}: elastictrain was installed without its sources; "
                         "run `elastictrain bench` from a source checkout (pip install -e .)")
    return folder


def _run(module: str, args: list[str], out: Path, root: Path, deadline_s: float, log_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)  # each benchmark starts its own local cluster
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    began = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        finally:
            _kill_group(proc)
    return {"command": " ".join(["python", "-m", module, *args, "--out", str(out)]), "rc": proc.returncode,
            "timed_out": timed_out, "wall_s": round(time.monotonic() - began, 1), "log": str(log_path)}


def _kill_group(proc: subprocess.Popen) -> None:
    """The benchmark's whole process group (Ray, torchrun ranks) goes with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_bench(args) -> int:
    """Run each benchmark's short mode; 0 when every one exits 0."""
    root = benchmarks_dir().parent
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only: Optional[list[str]] = [x for x in (getattr(args, "only", None) or "").split(",") if x] or None
    unknown = set(only or []) - set(SHORT_RUNS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(SHORT_RUNS)}")
    results = {}
    for name, (module, short_args, deadline) in SHORT_RUNS.items():
        if only and name not in only:
            continue
        print(f"elastictrain bench: {name} ...", flush=True)
        res = _run(module, short_args, out, root, deadline, out / f"{name}.log")
        res["ok"] = res["rc"] == 0 and not res["timed_out"]
        results[name] = res
        print(f"elastictrain bench: {name} {'ok' if res['ok'] else 'FAILED'} in {res['wall_s']} s "
              f"(log: {res['log']})", flush=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# elastictrain bench (short runs)\n", "| benchmark | result | wall | command |", "|---|---|---|---|"]
    for name, res in results.items():
        status = "ok" if res["ok"] else ("timed out" if res["timed_out"] else f"exit {res['rc']}")
        lines.append(f"| {name} | {status} | {res['wall_s']} s | `{res['command']}` |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    failed = [n for n, r in results.items() if not r["ok"]]
    if failed:
        print(f"elastictrain bench: failed: {', '.join(failed)} (logs in {out})", file=sys.stderr)
        return 1
    print(f"elastictrain bench: reports in {out}")
    return 0
