"""The benchmark suite: find the benchmarks, list them, run one, or run them all with a report.

Every `benchmarks/NAME.py` whose name does not start with `_` is a benchmark: it
has `build_parser()` (a `_common.BenchmarkParser`) and `main(argv) -> int`.
`list` reads each file's docstring without importing it; `all` runs each
benchmark as a child process with a deadline (its `QUICK_DEADLINE_S` with
`--quick`) and writes `bench.json` and `bench.md` next to the benchmarks' own
reports.

    python -m benchmarks list
    python -m benchmarks recovery --quick
    python -m benchmarks all --quick --out bench-out
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_QUICK_DEADLINE_S = 300.0
USAGE = "usage: python -m benchmarks {list | all [--quick] [--only NAMES] | NAME} [flags]"


@dataclass(frozen=True)
class BenchmarkInfo:
    name: str
    description: str
    quick_deadline_s: float


def benchmark_names() -> list[str]:
    """Every benchmark module in this folder, by name."""
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if not m.ispkg and not m.name.startswith("_"))


def describe(name: str) -> BenchmarkInfo:
    """A benchmark's one-line description and short-run deadline, read from its source (nothing imported)."""
    tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text())
    first = (ast.get_docstring(tree) or "").strip().split("\n\n")[0]
    deadline = DEFAULT_QUICK_DEADLINE_S
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "QUICK_DEADLINE_S" for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, (int, float))):
            deadline = float(node.value.value)
    return BenchmarkInfo(name, " ".join(first.split()), deadline)


def list_benchmarks() -> int:
    infos = [describe(name) for name in benchmark_names()]
    width = max(len(i.name) for i in infos)
    for info in infos:
        print(f"{info.name:<{width}}  {info.description}")
    return 0


def run_benchmark(name: str, argv: Sequence[str]) -> int:
    """Run one benchmark in this process."""
    from benchmarks import _common as C

    module = importlib.import_module(f"benchmarks.{name}")
    try:
        return int(module.main(list(argv)) or 0)
    except C.BenchmarkTimeout as exc:
        print(f"python -m benchmarks {name}: {exc}", file=sys.stderr)
        return 124


def all_parser() -> argparse.ArgumentParser:
    from benchmarks import _common as C

    p = argparse.ArgumentParser(prog="python -m benchmarks all", allow_abbrev=False,
                                description="Run every benchmark (its short run with --quick), each in a child "
                                            "process, and write bench.json and bench.md.")
    C.add_common_args(p, repeats=None, seed=None, help={
        "repeats": "passed to every benchmark (default: each benchmark's own)",
        "seed": "passed to every benchmark (default: each benchmark's own)",
        "timeout": "passed to every benchmark (default: each benchmark's own)",
        "quick": "each benchmark's short run, under its short-run deadline",
    })
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated subset of the benchmarks")
    return p


def run_all(argv: Sequence[str]) -> int:
    """Each benchmark (or the --only subset) as a child process; 0 when every one exits 0."""
    from benchmarks import _common as C

    parser = all_parser()
    args = parser.parse_args(list(argv))
    names = benchmark_names()
    only = [x for x in (args.only or "").split(",") if x]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(names)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    forward = ["--quick"] if args.quick else []
    for flag in ("repeats", "seed", "timeout"):
        if getattr(args, flag) is not None:
            forward += [f"--{flag}", f"{getattr(args, flag):g}" if flag == "timeout" else str(getattr(args, flag))]
    env = C.child_env()
    env.pop("RAY_ADDRESS", None)  # each benchmark starts its own local cluster
    if "OMP_NUM_THREADS" not in os.environ:
        env.pop("OMP_NUM_THREADS")  # each benchmark sets its own threads, as when it runs alone
    results = {}
    for name in only or names:
        limit: Optional[float] = describe(name).quick_deadline_s if args.quick else None
        cmd = [sys.executable, "-m", "benchmarks", name, *forward, "--out", str(out)]
        print(f"benchmarks: {name} ...", flush=True)
        run = C.run_child(cmd, timeout_s=limit, log_path=out / f"{name}.log", env=env)
        ok = run["rc"] == 0 and not run["timed_out"]
        results[name] = {"command": " ".join(["python -m benchmarks", name, *forward, "--out", str(out)]),
                         "rc": run["rc"], "timed_out": run["timed_out"], "wall_s": round(run["wall_s"], 1),
                         "log": str(out / f"{name}.log"), "ok": ok}
        print(f"benchmarks: {name} {'ok' if ok else 'FAILED'} in {results[name]['wall_s']} s "
              f"(log: {results[name]['log']})", flush=True)
    rows = [[name, "ok" if r["ok"] else ("timed out" if r["timed_out"] else f"exit {r['rc']}"), f"{r['wall_s']} s",
             f"`{r['command']}`"] for name, r in results.items()]
    title = "# benchmarks (short runs)\n\n" if args.quick else "# benchmarks\n\n"
    C.write_report(out, "bench", results, title + C.md_table(["benchmark", "result", "wall", "command"], rows))
    failed = [name for name, r in results.items() if not r["ok"]]
    if failed:
        print(f"benchmarks: failed: {', '.join(failed)} (logs in {out})", file=sys.stderr)
        return 1
    print(f"benchmarks: reports in {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n")
        list_benchmarks()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "list":
        return list_benchmarks()
    if command == "all":
        return run_all(rest)
    if command in benchmark_names():
        return run_benchmark(command, rest)
    print(f"python -m benchmarks: no benchmark {command!r}; choose from list, all, {', '.join(benchmark_names())}",
          file=sys.stderr)
    return 2
