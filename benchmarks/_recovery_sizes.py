"""Recovery against model size: `python -m benchmarks recovery --sizes 1M,10M,100M,250M`.

The recovery benchmark's job (`benchmarks/recovery.py`: a seeded MLP, AdamW, a process SIGKILLed
at the start of step K) at several model sizes, 2 workers (min 1), no sleep in a step, with two
faults: a follower's loss (rank 1) and the leader's (rank 0). Arms, sizes and faults are
interleaved within each repeat. The MLP's hidden width is set so that it holds about the asked
number of parameters.

Per run:
- recovery_s: kill to the first step completed after it (`analyse_recovery`, as for every arm);
- step_s: the median time between two steps of one process before the kill; stall_s = recovery_s -
  step_s (in the JSON) is no measure at large sizes: the survivor had done part of the lost step;
- elastictrain only, from the library's events: detect_s (kill to the first `world_changed`),
  and the `recovered` event's phases (elect, group, reenter, restore, first_step); runtime_s =
  elect + group + reenter + restore (what the runtime adds, the part meant to stay flat); resume_s =
  detect + runtime_s (kill to training going on). Detection is the rest of the survivor's step: it
  learns of the loss at its next collective;
- growth: the replacement of the lost worker joins later (a rebuild at a step boundary). Its
  pause is the `recovered` event of that term (the world's time from the planned change to its
  first commit, phases included), and back_to_full_s is kill to that commit;
- bytes_sent: what rank 0 broadcast to members behind or new (`state_sent` events);
- rebuild_peak_ratio: a survivor's peak RSS over the rebuild and its first step over its peak
  over two steps before the kill.

The figure (`--out DIR`: recovery_sizes.png) plots the recovery of every arm and, for
elastictrain, the runtime part, resume_s and the growth pause against the parameter count.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Any, Optional

from benchmarks import _common as C

SIZE_SUFFIX = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}
FAULTS = {"follower": 1, "leader": 0}  # the rank killed
PHASES = ("elect", "group", "reenter", "restore", "first_step")


def parse_size(text: str) -> int:
    """'100M' -> 100_000_000; a plain number is taken as is."""
    text = text.strip().upper()
    scale = SIZE_SUFFIX.get(text[-1:], None)
    value = float(text[:-1] if scale else text) * (scale or 1)
    if value < 1e4:
        raise ValueError(f"size {text!r} is below 10K parameters")
    return int(value)


def hidden_for(params: int) -> int:
    """The hidden width of the benchmark MLP (about 2*hidden**2 parameters) holding about `params`."""
    return max(8, round(math.sqrt(params / 2)))


def param_count(hidden: int) -> int:
    d_in, _, d_out = C.MODEL_SHAPES["tiny"]
    return (d_in + 1) * hidden + 2 * (hidden + 1) * hidden + (hidden + 1) * d_out


def measure_step(hidden: int, micro_batch: int, global_batch: int) -> float:
    """Seconds of one training step of the benchmark MLP at this width on one process (forward,
    backward over a worker's half of the global batch, AdamW), the median of three after a warm-up."""
    import torch

    C.set_threads(1)
    model = C.make_model("tiny", hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = C.make_dataset("tiny", n=max(64, global_batch))
    times = []
    for step in range(4):
        began = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for x, y in C.micro_batches(data, 0, global_batch, micro_batch, 0, 2):
            ((model(x) - y) ** 2).sum().backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - began)
    del model, opt
    return statistics.median(times)


def steps_for(a: argparse.Namespace, step_s: float) -> int:
    """Steps of a run at this size: the kill step, then enough to cover `--after-kill-s` (the
    replacement starting and joining) at about twice the one-process step (DDP's all-reduce)."""
    per_step = 2 * step_s + a.step_sleep + 0.005
    return a.kill_step + min(400, max(5, math.ceil(a.after_kill_s / per_step)))


def runtime_view(events: list[dict], kill_t: float) -> dict:
    """What elastictrain's events say of one run: detection, the phases of the recovery after the kill,
    the growth that brought the world back to full size, and the bytes of state sent."""
    out: dict[str, Any] = {}
    after = sorted((e for e in events if e.get("time", 0) >= kill_t), key=lambda e: e["time"])
    changed = [e for e in after if e["kind"] == "world_changed"]
    recovered = [e for e in after if e["kind"] == "recovered"]
    if changed:
        out["detect_s"] = changed[0]["time"] - kill_t
    if recovered:
        first = recovered[0]
        phases = first.get("phases") or {}
        out["phases"] = phases
        if phases:
            out["runtime_s"] = sum(phases.get(p, 0.0) for p in PHASES[:-1])  # elect, group, reenter, restore
        if "detect_s" in out and phases:
            out["resume_s"] = out["detect_s"] + out["runtime_s"]
    planned = [e for e in changed if "capacity" in str(e.get("reason", ""))]
    if planned:
        grown = [e for e in recovered if e.get("term", 0) > planned[0].get("term", 0)]
        if grown:
            out["growth_s"] = grown[0]["recovery_s"]
            out["growth_phases"] = grown[0].get("phases") or {}
    from benchmarks.recovery import back_to_full_size

    out["back_to_full_s"] = back_to_full_size(events, {"t": kill_t}, workers=2)  # by growth, or a spare at once
    sent = [e for e in after if e["kind"] == "state_sent"]
    out["bytes_sent"] = sum(int(e.get("bytes", 0)) for e in sent)
    out["state_sends"] = [{"term": e.get("term"), "bytes": e.get("bytes"), "seconds": e.get("seconds"),
                           "receivers": e.get("receivers")} for e in sent]
    return out


def run_sizes(a: argparse.Namespace, argv: Optional[list[str]], run_one) -> int:
    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        raise SystemExit(f"unknown faults {bad}; choose from {sorted(FAULTS)}")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    runs: list[dict] = []
    steps_at: dict[int, int] = {}  # hidden width -> steps of its runs
    t_start = time.time()
    for rep in range(a.repeats):
        for params in sizes:
            hidden = hidden_for(params)
            if hidden not in steps_at:
                steps_at[hidden] = steps_for(a, measure_step(hidden, a.micro_batch, a.global_batch))
            for fault in faults:
                for arm in arms:
                    b = copy.copy(a)
                    b.hidden, b.kill_rank, b.workers, b.steps = hidden, FAULTS[fault], 2, steps_at[hidden]
                    print(f"[run] {arm} {fault} {param_count(hidden) / 1e6:.1f}M params, repeat {rep + 1}/{a.repeats}",
                          flush=True)
                    r = run_one(arm, b, a.keep)
                    if r.get("unavailable"):
                        print(f"[skip] {arm}: {r['unavailable']}")
                        continue
                    row = {"arm": arm, "fault": fault, "params": param_count(hidden), "hidden": hidden, "steps": b.steps,
                           "ok": r.get("ok"), "recovery_s": r.get("recovery_s"), "wall_s": r.get("wall_s"),
                           "rebuild_peak_ratio": r.get("rebuild_peak_ratio"), "reentry_s": r.get("reentry_s")}
                    kill_t, row["step_s"] = r.get("kill_t"), r.get("step_s")
                    if row["recovery_s"] is not None and row["step_s"] is not None:
                        row["stall_s"] = row["recovery_s"] - row["step_s"]
                    if arm.startswith("elastictrain") and r.get("events") and kill_t is not None:
                        row.update(runtime_view(r["events"], kill_t))
                    if not r.get("ok"):
                        row["failure"] = {k: r.get(k) for k in ("rc", "timed_out", "error", "log_tail")}
                    runs.append(row)
                    if a.out:  # what is done so far survives an interrupted run
                        C.write_report(a.out, "recovery_sizes_partial", {"runs": runs}, "")
                    print("      " + " ".join(f"{k}={C.fmt(row.get(k), 3)}" for k in
                                              ("ok", "recovery_s", "step_s", "stall_s", "resume_s", "growth_s",
                                               "back_to_full_s", "rebuild_peak_ratio")), flush=True)
                    if row.get("phases"):
                        print("      phases " + " ".join(f"{k}={v:.3f}" for k, v in row["phases"].items())
                              + " | growth " + " ".join(f"{k}={v:.3f}" for k, v in (row.get("growth_phases") or {}).items())
                              + f" | sent {row.get('bytes_sent', 0) / 2**20:.0f} MiB", flush=True)
    summary = summarise(runs)
    data = {
        "benchmark": "recovery-sizes",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "command": C.command_line("recovery", argv),
        "params": {k: v for k, v in vars(a).items() if k not in ("trial", "trial_dir", "keep")},
        "machine": C.machine_info(),
        "definitions": __doc__,
        "summary": summary,
        "runs": runs,
    }
    md = render(data)
    jp, mp = C.write_report(a.out, "recovery_sizes", data, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    if a.out:
        png = plot(summary, a.out)
        if png:
            print(f"wrote {png}")
    return 0


def _median(rows: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["arm"], r["fault"], r["params"]), []).append(r)
    out = []
    for (arm, fault, params), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ok = [r for r in rows if r.get("ok")]
        row = {"arm": arm, "fault": fault, "params": params, "n": len(rows), "n_ok": len(ok)}
        for key in ("recovery_s", "step_s", "stall_s", "detect_s", "runtime_s", "resume_s", "growth_s", "back_to_full_s",
                    "bytes_sent", "rebuild_peak_ratio"):
            row[key] = _median(ok, key)
        for name in PHASES:
            row[f"phase_{name}_s"] = C.median(r["phases"].get(name) for r in ok if r.get("phases"))
            row[f"growth_{name}_s"] = C.median(r["growth_phases"].get(name) for r in ok if r.get("growth_phases"))
        row["recovery_s_all"] = [r.get("recovery_s") for r in rows]
        out.append(row)
    # Ratios against the smallest size of the same arm and fault, measured in the same run.
    smallest: dict[tuple, dict] = {}
    for row in out:
        key = (row["arm"], row["fault"])
        if key not in smallest or row["params"] < smallest[key]["params"]:
            smallest[key] = row
    for row in out:
        base = smallest[(row["arm"], row["fault"])]
        for key in ("stall_s", "resume_s", "runtime_s"):
            row[f"{key}_vs_smallest"] = (row[key] / base[key]) if row.get(key) and base.get(key) else None
    return out


def rerender(json_path: str, out_dir: str) -> None:
    """Summarise, tabulate and plot a finished run's JSON again (`python -m benchmarks._recovery_sizes FILE DIR`)."""
    import json
    from pathlib import Path

    data = json.loads(Path(json_path).read_text())
    data["summary"] = summarise(data["runs"])
    C.write_report(out_dir, "recovery_sizes", data, render(data))
    plot(data["summary"], out_dir)


def render(data: dict) -> str:
    rows = []
    for s in data["summary"]:
        rows.append([
            s["arm"], s["fault"], f"{s['params'] / 1e6:.1f}M", f"{s['n_ok']}/{s['n']}",
            C.fmt(s["recovery_s"], 3, " s"), C.fmt(s["step_s"], 3, " s"), C.fmt(s["detect_s"], 3, " s"),
            C.fmt(s["runtime_s"], 3, " s"), C.fmt(s["runtime_s_vs_smallest"], 2, "x"), C.fmt(s["resume_s"], 3, " s"),
            " / ".join(C.fmt(s[f"phase_{p}_s"], 3) for p in PHASES) if s["resume_s"] is not None else "",
            C.fmt(s["growth_s"], 2, " s"), C.fmt(s["back_to_full_s"], 2, " s"),
            C.fmt(None if s["bytes_sent"] is None else s["bytes_sent"] / 2**20, 0, " MiB"),
            C.fmt(s["rebuild_peak_ratio"], 2, "x"),
        ])
    return "\n".join([
        "# Recovery against model size\n",
        f"2 workers (min 1), AdamW, {data['params']['step_sleep'] * 1000:.0f} ms of sleep in a step; medians over "
        f"{data['params']['repeats']} repeat(s). Machine: {data['machine']['cpus']} CPUs, torch "
        f"{data['machine']['torch']}, ray {data['machine']['ray']}, torchft {data['machine']['torchft']}.\n",
        C.md_table(["arm", "fault", "params", "ok/runs", "recovery", "step before the kill", "detect",
                    "runtime (elect+group+reenter+restore)", "runtime vs smallest", "resume (kill to training on)",
                    "phases: elect / group / reenter / restore / first step (s)", "growth pause",
                    "kill to full size", "state sent", "survivor peak, rebuild / steady"], rows),
        f"\nCommand: `{data['command']}`\n",
    ])


def plot(summary: list[dict], out_dir: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib is not installed (pip install matplotlib): no figure")
        return None
    from pathlib import Path

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for s in summary:
        if s.get("recovery_s") is not None:
            series.setdefault(f"{s['arm']}, {s['fault']} loss: recovery", []).append((s["params"], s["recovery_s"]))
        if s.get("runtime_s") is not None:
            series.setdefault(f"{s['arm']}, {s['fault']} loss: runtime part", []).append((s["params"], s["runtime_s"]))
        if s.get("resume_s") is not None:
            series.setdefault(f"{s['arm']}, {s['fault']} loss: resume", []).append((s["params"], s["resume_s"]))
        if s.get("growth_s") is not None and s["fault"] == "follower":
            series.setdefault(f"{s['arm']}: growth pause", []).append((s["params"], s["growth_s"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Recovery against model size (2 workers, AdamW)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "recovery_sizes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    import sys

    rerender(sys.argv[1], sys.argv[2])
