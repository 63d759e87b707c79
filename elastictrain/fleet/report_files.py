"""`report.md`, `report.json` and PNG plots (matplotlib, Agg backend) of a computed report (`fleet.report`)."""

from __future__ import annotations

import json
import os
from typing import Any

PLOTS = ("steps_over_time.png", "world_size.png", "recoveries.png")


def write(report: dict, out_dir: str) -> list[str]:
    """Write `report.json`, `report.md` and the PNG plots (`PLOTS`) into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    paths.append(path)
    paths += _plots(report, out_dir)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(report))
    paths.append(path)
    return paths


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict) -> str:
    """The report as a short Markdown page (numbers, faults, plots)."""
    cur = report.get("currency") or ""
    lines = ["# Run report", "", "| | |", "|---|---|"]
    for key in ("runs", "steps_committed", "steps_redone", "goodput", "faults", "resume_rate", "recovery_s_median",
                "gpu_hours_total", "effective_gpu_hours", "setup_hours", "largest_provider_share",
                "bytes_across_boundaries", "cost_total", "cost_per_effective_gpu_hour"):
        unit = f" {cur}" if key.startswith("cost") and report.get(key) is not None else ""
        lines.append(f"| {key} | {_fmt(report.get(key))}{unit} |")
    lines += ["", "## GPU-hours by provider", ""]
    lines += [f"- {p}: {_fmt(h)}" for p, h in sorted(report["gpu_hours"].items())] or ["- none"]
    if report.get("cost_by_provider_instance") is not None:
        lines += ["", f"## Cost ({cur})", ""]
        lines += [f"- {name}: {_fmt(v)}" for name, v in sorted(report["cost_by_provider_instance"].items())]
        lines += [f"- setup: {_fmt(report['setup_cost'])}", f"- egress: {_fmt(report['egress_cost'])}"]
    lines += ["", "## Faults", "", "| # | kind | members | term | at (s) | resumed | recovery (s) |",
              "|---|---|---|---|---|---|---|"]
    for i, f in enumerate(report["fault_list"]):
        lines.append(f"| {i} | {f['fault']} | {', '.join(f['members'])} | {f['term']} | {_fmt(f['at_s'])} | "
                     f"{'yes' if f['resumed'] else 'no'} | {_fmt(f['recovery_s'])} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, points in sorted(report["steps_over_time"].items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="seconds", ylabel="steps (share of each commit)", title="Steps by provider/region")
    if report["steps_over_time"]:
        ax.legend(fontsize="small")
    save(fig, PLOTS[0])

    fig, ax = plt.subplots(figsize=(7, 3))
    sizes = report["world_sizes"]
    if sizes:
        ax.step([s[0] for s in sizes], [s[1] for s in sizes], where="post")
    for f in report["fault_list"]:
        ax.axvline(f["at_s"], color="red", alpha=0.4, lw=1)
    ax.set(xlabel="seconds", ylabel="workers", title="World size (red: faults)")
    save(fig, PLOTS[1])

    fig, ax = plt.subplots(figsize=(7, 3))
    faults = report["fault_list"]
    ax.bar(range(len(faults)), [f["recovery_s"] or 0 for f in faults],
           color=["tab:blue" if f["resumed"] else "tab:red" for f in faults])
    ax.set_xticks(range(len(faults)), [f["fault"] for f in faults], rotation=30, fontsize="small")
    ax.set(ylabel="seconds", title="Recovery per fault (red: never resumed)")
    save(fig, PLOTS[2])
    return paths
