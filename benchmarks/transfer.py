"""The state hand-over to a member behind or new (`take_rank0_state`) against one plain broadcast of a flat
buffer of the same bytes: 2 gloo processes on 127.0.0.1, a model + AdamW state, interleaved repeats.

Arms, timed on the receiver after a barrier, in turn within each repeat:
- plain: one `dist.broadcast` of a preallocated flat uint8 buffer as large as the state's tensors;
- behind: `take_rank0_state` into a member that holds every tensor (its optimizer has stepped);
- new: `take_rank0_state` into a member whose optimizer has not stepped (it allocates AdamW's state);
- per-tensor: the former path, one broadcast per tensor into a new buffer, then a load (no header).
Peak RSS growth of the receiver per arm comes from VmHWM after resetting it (/proc/self/clear_refs).

Usage: python -m benchmarks transfer [--sizes 100,400] [--small 2000] [--repeats 5] [--quick]
Writes transfer.json and transfer.md to --out.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import _common as C

QUICK_DEADLINE_S = 240
HIDDEN = 1024
ARMS = ("plain", "behind", "new", "per_tensor")


def build_parser() -> C.BenchmarkParser:
    parser = C.BenchmarkParser("transfer", __doc__, repeats=5, quick={"repeats": 2, "sizes": "20", "small": 200},
                               help={"repeats": "interleaved repeats of every arm (default: 5)"})
    parser.add_argument("--sizes", default="100,400", metavar="MB",
                        help="state sizes in MB (parameters + AdamW's two moments), comma-separated (default: 100,400)")
    parser.add_argument("--small", type=int, default=2000, metavar="N",
                        help="layers of a many-small-tensors model (16x16 linear layers; 0: none; default: 2000)")
    return parser


def _model(case: dict) -> nn.Module:
    if case["kind"] == "small":
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(case["layers"])])
    return nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(case["layers"])])


def _state(case: dict, seed: int, stepped: bool):
    from elastictrain.runtime.state import ElasticState

    torch.manual_seed(seed)
    model = _model(case)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if stepped:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = ElasticState({"model": model, "optimizer": opt, "tokens": 0})
    state.step = 3
    return state


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _per_tensor(state, rank: int) -> None:
    """The former path: one broadcast per tensor into a new buffer on the receiver, then a load."""
    from elastictrain.statetree import unflatten_state

    tensors, skeleton = state.flatten()
    received = {}
    for name, t in tensors.items():
        buf = t.detach().contiguous() if rank == 0 else torch.empty_like(t)
        dist.broadcast(buf, src=0)
        received[name] = buf
    if rank:
        state.load_tree(unflatten_state(received, skeleton))


def _timed(fn, rank: int) -> dict:
    dist.barrier()
    peak_ok = _reset_peak()
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    growth = (_rss_kib("VmHWM") - before) / 1024 if peak_ok else None
    return {"s": wall, "rss_growth_mib": growth}


def _rank(rank: int, port: int, cases: list, repeats: int, out_path: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=300))
    from elastictrain.runtime import transfer
    from elastictrain.runtime.state import take_rank0_state

    cpu = torch.device("cpu")
    results = []
    try:
        for case in cases:
            behind = _state(case, seed=7 if rank == 0 else 11, stepped=True)
            tensors, _ = behind.flatten()
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            flat = torch.zeros(nbytes, dtype=torch.uint8)  # touched: the plain arm pays no page faults
            with transfer.recording() as stats:
                take_rank0_state(behind, device=cpu)  # warm-up; and the broadcasts it takes
            times = {arm: [] for arm in ARMS}
            for _ in range(repeats):
                times["plain"].append(_timed(lambda: dist.broadcast(flat, src=0), rank))
                times["behind"].append(_timed(lambda: take_rank0_state(behind, device=cpu), rank))
                fresh = behind if rank == 0 else _state(case, seed=13, stepped=False)
                times["new"].append(_timed(lambda: take_rank0_state(fresh, device=cpu), rank))
                del fresh
                times["per_tensor"].append(_timed(lambda: _per_tensor(behind, rank), rank))
            if rank == 1:
                results.append({**case, "state_mb": nbytes / 1e6, "tensors": len(tensors),
                                "broadcasts": stats.broadcasts, "staging_mib": stats.staging_bytes / 2**20,
                                "times": times})
            del behind, tensors, flat
        if rank == 1:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def cases_of(args) -> list[dict]:
    cases = []
    per_layer = (HIDDEN * HIDDEN + HIDDEN) * 4 * 3  # parameters and AdamW's two moments
    for mb in (float(x) for x in args.sizes.split(",") if x):
        cases.append({"name": f"{mb:g} MB", "kind": "large", "layers": max(1, round(mb * 1e6 / per_layer))})
    if args.small:
        cases.append({"name": f"{args.small} x Linear(16,16)", "kind": "small", "layers": args.small})
    return cases


def summarise(case: dict) -> dict:
    med = {arm: C.median(r["s"] for r in case["times"][arm]) for arm in ARMS}
    rss = {arm: max((r["rss_growth_mib"] for r in case["times"][arm] if r["rss_growth_mib"] is not None),
                    default=None) for arm in ARMS}
    return {"median_s": med, "peak_rss_growth_mib": rss,
            "ratio_behind": med["plain"] / med["behind"], "ratio_new": med["plain"] / med["new"],
            "ratio_per_tensor": med["plain"] / med["per_tensor"],
            "plain_gb_s": case["state_mb"] / 1e3 / med["plain"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = cases_of(args)
    with C.deadline(args.timeout), tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "transfer.json")
        mp.spawn(_rank, args=(C.free_port(), cases, args.repeats, out_path), nprocs=2, join=True)
        results = json.loads(Path(out_path).read_text())
    rows = []
    for case in results:
        case["summary"] = s = summarise(case)
        med, rss = s["median_s"], s["peak_rss_growth_mib"]
        rows.append([case["name"], f"{case['state_mb']:.0f}", case["tensors"], case["broadcasts"],
                     f"{med['plain']:.3f} ({s['plain_gb_s']:.2f} GB/s)",
                     f"{med['behind']:.3f} ({s['ratio_behind']:.2f}x)", f"{med['new']:.3f} ({s['ratio_new']:.2f}x)",
                     f"{med['per_tensor']:.3f} ({s['ratio_per_tensor']:.2f}x)",
                     " / ".join(C.fmt(rss[a], 0) for a in ARMS)])
    table = C.md_table(["state", "MB", "tensors", "broadcasts", "plain broadcast s", "behind s (rate vs plain)",
                        "new s (rate vs plain)", "per-tensor (former) s", "peak RSS growth MiB plain/behind/new/per-tensor"],
                       rows)
    print(table)
    data = {"benchmark": "transfer", "command": C.command_line("transfer", argv), "params": vars(args),
            "machine": C.machine_info(), "cases": results}
    C.write_report(args.out, "transfer", data,
                   f"# State hand-over against a plain broadcast (2 gloo ranks, 127.0.0.1, median of {args.repeats})\n\n"
                   + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
