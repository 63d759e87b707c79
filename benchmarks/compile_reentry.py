"""Re-entry of train_fn with a torch.compile'd model: the first step of each new model instance in one
process (what a survivor does after a rebuild) against the first compile, for each way of wrapping.

Usage: TORCH_LOGS=recompiles python -m benchmarks compile_reentry [--backend inductor] [--repeats 1]
(a recompilation shows in the log; a new group between entries 1 and 2 plays a rebuild).
--quick: 2 entries on the aot_eager backend (dynamo and AOTAutograd, no code generation: seconds, where
inductor on a CPU needs a C++ compiler and minutes). Writes compile_reentry.json and .md to --out.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from benchmarks import _common as C


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 8))


WRAPS = {
    "compiled": lambda m, b: torch.compile(m, backend=b),
    "compiled_then_ddp": lambda m, b: torch.nn.parallel.DistributedDataParallel(torch.compile(m, backend=b)),
    "ddp_then_compiled": lambda m, b: torch.compile(torch.nn.parallel.DistributedDataParallel(m), backend=b),
}


def _group(path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(path, 1), rank=0, world_size=1)


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("compile_reentry", __doc__, repeats=1,
                               quick={"entries": 2, "backend": "aot_eager"},
                               help={"repeats": "times each way of wrapping is measured, from a fresh dynamo cache "
                                                "(default: 1)"})
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--entries", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    x = torch.randn(16, 64)
    rows = []
    with C.deadline(args.timeout), tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, wrap in WRAPS.items():
                torch._dynamo.reset()
                _group(os.path.join(tmp, f"{name}-{rep}-0"))
                for entry in range(args.entries):
                    model = wrap(_net(), args.backend)  # train_fn builds new objects on each entry
                    first = C.time_call(lambda: model(x).sum().backward())
                    nxt = C.time_call(lambda: model(x).sum().backward())
                    print(f"{name}: entry {entry} first step {first:.3f} s, next {nxt:.4f} s", flush=True)
                    rows.append({"wrap": name, "repeat": rep, "entry": entry, "first_step_s": first, "next_step_s": nxt})
                    dist.destroy_process_group()  # a rebuild: a new group for the next entry
                    _group(os.path.join(tmp, f"{name}-{rep}-{entry + 1}"))
                dist.destroy_process_group()
    table = [[w, e, C.fmt(C.median(r["first_step_s"] for r in rows if (r["wrap"], r["entry"]) == (w, e)), 3, " s"),
              C.fmt(C.median(r["next_step_s"] for r in rows if (r["wrap"], r["entry"]) == (w, e)), 4, " s")]
             for w in WRAPS for e in range(args.entries)]
    data = {"benchmark": "compile_reentry", "command": C.command_line("compile_reentry", argv), "params": vars(args),
            "machine": C.machine_info(), "runs": rows}
    C.write_report(args.out, "compile_reentry", data,
                   f"# First step of each train_fn entry, torch.compile backend {args.backend}\n\n"
                   f"Medians over {args.repeats} repeat(s).\n\n"
                   + C.md_table(["wrap", "entry", "first step", "next step"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
