"""The `elastictrain` command: demo, ckpt (ls/verify/export/keygen), report, bench (deprecated).

Every failure exits non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from elastictrain.errors import ElasticTrainError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastictrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small model on a local Ray cluster, with injected failures")
    demo.add_argument("--steps", type=int, default=120, help="optimizer steps to train")
    demo.add_argument("--workers", type=int, default=3, help="worker actors")
    demo.add_argument("--faults", type=int, default=3, help="workers (the leader among them) killed at random steps")
    demo.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and the model")
    demo.add_argument("--checkpoint-uri", default=None, help="also write checkpoints here (fsspec URI)")
    demo.add_argument("--json", dest="json_out", default=None, help="write the report as JSON to this path")

    from elastictrain.checkpoint.cli import add_ckpt_parser

    add_ckpt_parser(sub)

    from elastictrain.fleet.report_cli import add_report_parser

    add_report_parser(sub)

    bench = sub.add_parser("bench", help=f"deprecated: {BENCH_MOVED}")
    bench.add_argument("--out", default="bench-out", help="folder for JSON and Markdown reports")
    bench.add_argument("--only", default=None, help="comma-separated subset (see `python -m benchmarks list`)")
    return parser


BENCH_MOVED = "run `python -m benchmarks all --quick` from a source checkout"


def run_bench(args: argparse.Namespace) -> int:
    """The deprecated `bench` command: runs the current directory's `benchmarks` package, or exits 2."""
    cwd = os.getcwd()
    spec = PathFinder.find_spec("benchmarks", [cwd])
    folders = (spec.submodule_search_locations or []) if spec else []
    if not any((Path(folder) / "__main__.py").is_file() for folder in folders):
        print(f"elastictrain bench: deprecated and no benchmarks package in {cwd}: {BENCH_MOVED}", file=sys.stderr)
        return 2
    print(f"elastictrain bench: deprecated: {BENCH_MOVED}", file=sys.stderr)
    cmd = [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", args.out]
    if args.only:
        cmd += ["--only", args.only]
    return subprocess.call(cmd, cwd=cwd)


def one_line(exc: BaseException) -> str:
    """An error as one line that says what is wrong (a pydantic error's reason is on its second line)."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{exc.title}: {where + ': ' if where else ''}{first['msg']}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from elastictrain.demo import run_demo

            return run_demo(args)
        if args.command == "ckpt":
            from elastictrain.checkpoint.cli import run_ckpt

            return run_ckpt(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "report":
            from elastictrain.fleet.report_cli import run_report

            return run_report(args)
    except (ElasticTrainError, OSError, ValueError) as exc:
        print(f"elastictrain {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - `ckpt` reaches storage backends, whose errors share no base
        if args.command not in ("ckpt", "report"):
            raise
        print(f"elastictrain {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"elastictrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2
