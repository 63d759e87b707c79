"""The main job as a user runs it: `elastictrain demo` in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from elastictrain.demo_output import EXPLANATION, RAY_WORKER_DIED


@pytest.mark.slow
def test_demo_recovers_from_every_fault_and_matches_one_process(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "elastictrain", "demo", "--steps", "20", "--faults", "2", "--seed", "3",
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Recovery report" in proc.stdout
    # Ray's report of the workers the demo killed itself ("... OOM killer ...") is replaced by one explanation.
    shown = proc.stdout + proc.stderr
    assert RAY_WORKER_DIED not in shown
    assert shown.count(EXPLANATION) <= 1 and shown.count("OOM killer") == shown.count(EXPLANATION)
    # stderr is no terminal here: plain progress lines, the last one at the end of the run
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[elastictrain]")]
    assert progress and "\r" not in proc.stderr
    assert progress[-1].startswith("[elastictrain] run ended at step 20/20 | world ")
    assert "samples/s" in progress[-1] and "| lost 2 |" in progress[-1]
    assert int(re.search(r"recoveries (\d+)", progress[-1]).group(1)) >= 2  # one per fault at least
    report = json.loads(report_path.read_text())
    assert report["steps"] == 20
    # Every fault lands, however slowly a replacement starts: the loop waits for a whole world at a fault step.
    assert [f["target"] for f in report["faults"]] == ["leader", "follower"]
    assert report["faults_scheduled"] == 2 and report["workers_lost"] == 2
    assert all(f["recovery_s"] is not None and f["steps_redone"] <= 1 for f in report["faults"])
    assert report["max_param_diff_vs_one_process"] < 1e-4


def test_demo_rejects_bad_arguments_with_one_line(capsys):
    from elastictrain.cli import main

    assert main(["demo", "--workers", "1"]) == 1  # in this process: refused before any Ray starts
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "at least 2 workers" in err
