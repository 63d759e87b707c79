"""`elastictrain report` on a finished toy run with two injected kills: every number in report.json is
recomputed here from the run's event log files by this test's own code (and from the Result)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import elastictrain as et
from elastictrain.testing.toy import ToyTask
from tests.toy_runs import fit_toy

ROOT = Path(__file__).resolve().parents[2]
PRICES = ROOT / "examples" / "prices.toml"


def independent(lines: list[dict], default_hourly: float) -> dict:
    """The report's numbers for a one-run log of a local cluster (no node labels), from the documented
    definitions (docs/reports.md), without the report's code."""
    end = max(r["time"] for r in lines)
    steps: dict[int, dict[int, float]] = {}  # term -> step -> commit time
    formed: dict[int, float] = {}
    members: dict[int, set] = {}
    started, joined, ended = {}, {}, {}
    injected: dict[int, dict] = {}
    unplanned, faulted = [], set()
    checkpoints = []
    for r in lines:
        kind, t = r["kind"], r["time"]
        if kind == "steps":
            n = max(1, r["last"] - r["first"])
            for s in range(r["first"], r["last"] + 1):
                steps.setdefault(r["term"], {})[s] = r["first_time"] + (t - r["first_time"]) * (s - r["first"]) / n
        elif kind == "joined":
            formed[r["term"]] = min(formed.get(r["term"], t), t)
            members.setdefault(r["term"], set()).add(r["member"])
            joined.setdefault(r["member"], t)
        elif kind == "worker_started":
            started[r["member"]] = t
        elif kind in ("worker_lost", "worker_left"):
            ended.setdefault(r["member"], t)
            if kind == "worker_lost" and r["member"] not in faulted:
                unplanned.append(t)
                faulted.add(r["member"])
        elif kind == "fault_injected":
            faulted.add(r["member"])
            injected.setdefault(r["index"], {"time": t, "fault": r["fault"]})
        elif kind == "checkpoint":
            checkpoints.append(r)
    commits = sum(len(s) for s in steps.values())
    owner = {}
    for term in sorted(steps):
        for s in steps[term]:
            owner[s] = term
    fault_times = sorted([f["time"] for f in injected.values()] + unplanned)
    recoveries = []
    for ft in fault_times:
        hit = max((term for term, t in formed.items() if t <= ft), default=0)
        firsts = [min(s.values()) for term, s in steps.items() if term > hit and min(s.values()) > ft]
        if firsts:
            recoveries.append(min(firsts) - ft)
    held = {m: (ended.get(m, end) - t) / 3600 for m, t in started.items()}
    effective = sum(len(members[term]) * (max(s.values()) - formed[term]) / 3600
                    * sum(1 for x in s if owner[x] == term) / len(s) for term, s in steps.items())
    cost = sum(held.values()) * default_hourly
    return {
        "commits": commits, "distinct": len(owner), "recoveries": recoveries, "faults": len(fault_times),
        "injected": injected, "held_hours": sum(held.values()), "effective": effective, "cost": cost,
        "setup_hours": sum(joined[m] - started[m] for m in started if m in joined) / 3600,
        "checkpoint_bytes": sum(r["bytes_written"] for r in checkpoints), "checkpoints": len(checkpoints),
        "world_sizes": sorted((formed[t], len(members[t]), t) for t in formed),
    }


def test_report_of_a_run_with_two_kills_matches_its_event_log(ray_session, tmp_path):
    uri = f"file://{tmp_path}/run"
    chaos = et.ChaosSchedule.mixed(count=2, seed=5, full_world=2, kinds=("kill_follower", "kill_leader"),
                                   gap_steps=3)
    result = fit_toy(ToyTask(total_steps=40, step_sleep_s=0.1), workers=(2, 3), callbacks=[chaos],
                     checkpoint=et.CheckpointConfig(uri=uri, every_steps=5))
    assert len(chaos.fired) == 2 and result.events_uri == f"{uri}/events"

    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "elastictrain", "report", uri, "--prices", str(PRICES),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    for name in ("report.md", "report.json", "steps_over_time.png", "world_size.png", "recoveries.png"):
        assert (out / name).stat().st_size > 0
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    report = json.loads((out / "report.json").read_text())

    files = sorted((tmp_path / "run" / "events").glob("*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    assert [r["kind"] for r in lines].count("log_opened") == 1
    default_hourly = tomllib.loads(PRICES.read_text())["providers"]["unknown"]["default_hourly"]
    want = independent(lines, default_hourly)

    # the run's own account, kept in memory by the driver
    assert want["commits"] == sum(last - first + 1 for _, first, last in result.commit_spans)
    assert want["commits"] - want["distinct"] == result.steps_redone
    assert sorted((index, f["fault"]) for index, f in want["injected"].items()) == \
        sorted((f.index, f.kind) for f in chaos.fired)

    approx = pytest.approx
    assert report["runs"] == 1
    assert report["steps_committed"] == want["commits"]
    assert report["distinct_steps"] == want["distinct"] == 40
    assert report["steps_redone"] == want["commits"] - want["distinct"]
    assert report["goodput"] == approx(want["distinct"] / want["commits"])
    assert report["faults"] == want["faults"] >= 2
    assert report["faults_resumed"] == len(want["recoveries"]) == want["faults"]  # every kill was recovered from
    assert report["resume_rate"] == 1.0
    assert sorted(f["recovery_s"] for f in report["fault_list"]) == approx(sorted(want["recoveries"]))
    assert report["recovery_s_max"] == approx(max(want["recoveries"]))
    assert report["recovery_s_median"] == approx(statistics.median(want["recoveries"]))
    assert report["gpu_hours"] == approx({"unknown": want["held_hours"]})  # CPU workers count one each
    assert report["gpu_hours_total"] == approx(want["held_hours"])
    assert report["gpu_count_basis"] == ["one per worker without a GPU"]
    assert report["effective_gpu_hours"] == approx(want["effective"])
    assert 0 < report["effective_gpu_hours"] < report["gpu_hours_total"]
    assert report["setup_hours"] == approx(want["setup_hours"])
    assert report["steps_by_provider"] == approx({"unknown": want["commits"]})
    assert report["steps_by_region"] == approx({"unknown": want["commits"]})
    assert report["largest_provider_share"] == approx(1.0)
    assert report["bytes_across_boundaries"] == 0  # the writer's provider is unknown on a local cluster
    assert report["checkpoints_logged"] == want["checkpoints"] >= 1
    assert report["checkpoint_bytes"] == want["checkpoint_bytes"] > 0
    assert report["currency"] == "USD"
    assert report["cost_by_provider_instance"] == approx({"unknown/default": want["cost"]})
    assert report["setup_cost"] == 0 and report["egress_cost"] == 0 and report["unpriced_worker_hours"] == 0
    assert report["cost_total"] == approx(want["cost"])
    assert report["cost_per_effective_gpu_hour"] == approx(want["cost"] / want["effective"])
    t0 = min(r["time"] for r in lines)
    assert [row[1:] for row in report["world_sizes"]] == [[n, 0, term] for _, n, term in want["world_sizes"]]
    assert [row[0] for row in report["world_sizes"]] == approx([t - t0 for t, _, _ in want["world_sizes"]])
    assert report["steps_over_time"]["unknown/unknown"][-1][1] == approx(want["commits"])
    stored = sorted(p.name for p in (tmp_path / "run" / "manifests").iterdir())
    assert sorted(m["name"].rsplit("/", 1)[-1] for m in report["manifests"]) == stored
    assert report["log"]["files"] == len(files) and report["log"]["events"] == len(lines)
    assert report["log"]["skipped_lines"] == report["log"]["skipped_files"] == 0
    assert all(not math.isnan(v) for v in (report["goodput"], report["effective_gpu_hours"]))
