"""The benchmark suite's entry point and shared flags (nothing is measured), and the deprecated `elastictrain bench`."""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import _common as C
from benchmarks import _suite

REPO = Path(__file__).resolve().parents[2]
SHARED = ["--quick", "--repeats", "2", "--seed", "3", "--out", "X", "--timeout", "5"]


def benchmark_files() -> list[str]:
    return sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", benchmark_files())
def test_every_benchmark_accepts_the_shared_flags(name):
    module = importlib.import_module(f"benchmarks.{name}")
    parser = module.build_parser()
    assert isinstance(parser, C.BenchmarkParser) and callable(module.main)
    args = parser.parse_args(SHARED)
    assert (args.quick, args.repeats, args.seed, args.out, args.timeout) == (True, 2, 3, "X", 5.0)
    # the short run's own settings apply where no flag overrides them
    for dest, value in parser.quick_defaults.items():
        if dest not in ("repeats", "seed", "out", "timeout"):
            assert getattr(args, dest) == value


def test_quick_defaults_yield_to_flags_given():
    from benchmarks import accumulate

    assert accumulate.build_parser().parse_args([]).repeats == 15
    quick = accumulate.build_parser().parse_args(["--quick"])
    assert (quick.repeats, quick.micro_steps) == (3, 4)
    assert accumulate.build_parser().parse_args(["--quick", "--micro-steps", "9"]).micro_steps == 9


def test_old_spellings_still_work_say_so_and_are_hidden(capsys):
    from benchmarks import accumulate, overhead

    assert accumulate.build_parser().parse_args(["--rounds", "4"]).repeats == 4
    assert overhead.build_parser().parse_args(["--world", "5"]).workers == 5
    err = capsys.readouterr().err
    assert "--rounds is deprecated; use --repeats" in err and "--world is deprecated; use --workers" in err
    assert overhead.build_parser().parse_args([]).workers == 2
    text = overhead.build_parser().format_help()
    assert "--workers" in text and "--world" not in text and "--rounds" not in text


def test_a_flag_without_effect_says_so(capsys):
    from benchmarks import driver_memory

    driver_memory.build_parser().parse_args([])
    assert capsys.readouterr().err == ""
    driver_memory.build_parser().parse_args(["--repeats", "3"])
    assert "--repeats has no effect here" in capsys.readouterr().err


def test_list_names_every_benchmark_file():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "list"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 1) for line in proc.stdout.splitlines() if line.strip()]
    assert [row[0] for row in rows] == benchmark_files()
    assert all(len(row) == 2 and len(row[1]) > 20 for row in rows)


def test_all_rejects_unknown_names(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(C, "run_child", lambda cmd, *a, **k: ran.append(cmd))
    with pytest.raises(SystemExit) as exc:
        _suite.main(["all", "--only", "recovery,nope", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert ran == [] and not (tmp_path / "bench.json").exists()


def test_all_runs_each_benchmark_as_a_child_and_writes_the_report(tmp_path, monkeypatch):
    calls = []

    def fake_run_child(cmd, timeout_s, log_path, env=None, cwd=None):
        calls.append((cmd, timeout_s, env))
        return {"rc": 3 if "overhead" in cmd else 0, "timed_out": False, "wall_s": 0.5}

    monkeypatch.setattr(C, "run_child", fake_run_child)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rc = _suite.main(["all", "--quick", "--only", "recovery,overhead,commit_copy", "--seed", "7",
                      "--out", str(tmp_path)])
    assert rc == 1  # overhead failed
    assert [cmd[cmd.index("benchmarks") + 1] for cmd, _, _ in calls] == ["recovery", "overhead", "commit_copy"]
    for cmd, _, env in calls:
        assert cmd[:3] == [sys.executable, "-m", "benchmarks"]
        assert cmd[4:] == ["--quick", "--seed", "7", "--out", str(tmp_path)]
        assert "RAY_ADDRESS" not in env and "OMP_NUM_THREADS" not in env
        assert str(REPO) in env["PYTHONPATH"].split(":")
    assert [t for _, t, _ in calls] == [240.0, 300.0, _suite.DEFAULT_QUICK_DEADLINE_S]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {n: r["ok"] for n, r in report.items()} == {"recovery": True, "overhead": False, "commit_copy": True}
    assert "| overhead | exit 3 |" in (tmp_path / "bench.md").read_text()


def test_deadline_interrupts_the_main_thread_then_clears():
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(C.BenchmarkTimeout, match="--timeout 0.05"):
        with C.deadline(0.05):
            threading.Event().wait(30)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before
    with C.deadline(None):
        pass


def test_no_benchmark_edits_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "benchmarks").rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_bench_command_without_a_checkout_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from elastictrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m benchmarks all --quick" in err


def test_bench_command_runs_the_checkouts_benchmarks(tmp_path, monkeypatch, capsys):
    from elastictrain.cli import main

    seen = tmp_path / "argv.json"
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--out", "o", "--only", "recovery"]) == 3
    assert json.loads(seen.read_text()) == ["all", "--quick", "--out", "o", "--only", "recovery"]
    assert "deprecated" in capsys.readouterr().err


def test_recovery_sizes_reads_the_phases_growth_and_state_sent_from_the_events():
    from benchmarks import _recovery_sizes as S

    assert S.parse_size("100M") == 100_000_000 and S.parse_size("12.5k") == 12_500
    with pytest.raises(ValueError):
        S.parse_size("10")
    assert abs(S.param_count(S.hidden_for(10_000_000)) - 10_000_000) < 0.01 * 10_000_000
    phases = {"elect": 0.1, "group": 0.1, "reenter": 0.05, "restore": 0.05, "first_step": 0.2}
    events = [
        {"kind": "joined", "time": 99.0, "term": 1},
        {"kind": "world_changed", "time": 100.2, "term": 1, "reason": "peer lost"},
        {"kind": "recovered", "time": 100.7, "term": 2, "recovery_s": 0.5, "phases": phases},
        {"kind": "world_changed", "time": 104.0, "term": 2, "reason": "planned at step 9: capacity is waiting to join"},
        {"kind": "state_sent", "time": 104.5, "term": 3, "bytes": 4096, "seconds": 0.2, "receivers": [1]},
        {"kind": "recovered", "time": 105.0, "term": 3, "recovery_s": 1.0, "phases": phases, "world_size": 2},
    ]
    view = S.runtime_view(events, kill_t=100.0)
    assert view["detect_s"] == pytest.approx(0.2)
    assert view["resume_s"] == pytest.approx(0.2 + 0.3)  # detection, then every phase but the first step
    assert view["growth_s"] == 1.0 and view["back_to_full_s"] == pytest.approx(5.0)
    assert view["bytes_sent"] == 4096
    rows = [{"arm": "elastictrain", "fault": "follower", "params": p, "ok": True, "stall_s": s, "resume_s": s}
            for p, s in ((1_000_000, 0.2), (100_000_000, 0.3))]
    summary = {r["params"]: r for r in S.summarise(rows)}
    assert summary[100_000_000]["stall_s_vs_smallest"] == pytest.approx(1.5)


def test_recovery_back_to_full_size_is_the_first_full_world_commit_after_the_kill():
    from benchmarks.recovery import back_to_full_size

    kill = {"t": 100.0}
    events = [
        {"kind": "recovered", "time": 99.0, "world_size": 3},   # before the kill: not this recovery
        {"kind": "recovered", "time": 100.2, "world_size": 2},  # the shrunken world trains again
        {"kind": "world", "time": 103.0, "world_size": 3},
        {"kind": "recovered", "time": 103.5, "world_size": 3},  # grown back to full size
        {"kind": "recovered", "time": 110.0, "world_size": 3},
    ]
    assert back_to_full_size(events, kill, workers=3) == pytest.approx(3.5)
    assert back_to_full_size(events[:3], kill, workers=3) is None
    assert back_to_full_size(events, None, workers=3) is None


def test_recovery_spares_flag_adds_the_spares_arm_and_the_arm_needs_it():
    from benchmarks import recovery

    args = recovery.build_parser().parse_args(["--spares", "1"])
    assert args.spares == 1 and "--spares" in recovery.trial_args(args)
    with pytest.raises(SystemExit):
        recovery.main(["--arms", "elastictrain-spares"])


def test_overhead_ray_idle_arm_runs_the_ddp_loop_inside_an_idle_ray_cluster(monkeypatch, tmp_path):
    import contextlib

    from benchmarks import overhead

    seen = []

    @contextlib.contextmanager
    def cluster(a, d):
        seen.append("up")
        yield
        seen.append("down")

    def child(cmd, timeout_s, log_path, **kw):
        seen.append(("run", cmd[0], "up" in seen and "down" not in seen))
        out = Path(cmd[cmd.index("--out-file") + 1])
        out.write_text(json.dumps({"steps_per_s": 2.0, "median_step_s": 0.5}))
        return {"rc": 0, "timed_out": False, "wall_s": 1.0}

    monkeypatch.setattr(overhead, "ray_cluster_up", cluster)
    monkeypatch.setattr(C, "run_child", child)
    a = overhead.build_parser().parse_args(["--arms", "ddp,ddp_ray_idle"])
    assert overhead.run_one("ddp", a)["ok"] and seen == [("run", "torchrun", False)]
    seen.clear()
    assert overhead.run_one("ddp_ray_idle", a)["ok"]
    assert seen == ["up", ("run", "torchrun", True), "down"]  # the same torchrun loop, while the cluster is up


def test_resume_rate_node_ops_serve_every_fault_kind_and_the_ray_train_arm_replays_them():
    from benchmarks import resume_rate as R
    from elastictrain.testing.faults import FAULT_KINDS, ChaosSchedule

    assert set(R.RAYTRAIN_KINDS) == set(FAULT_KINDS)
    assert {label["provider"] for label in R.LABELS} == {"aws", "gcp", "azure"}
    assert all(len({l["region"] for l in R.LABELS if l["provider"] == p}) == 2 for p in ("aws", "gcp", "azure"))
    for ops in (R.ClusterNodes.__new__(R.ClusterNodes), R._NoNodes()):  # the default mix needs silence and notice
        schedule = ChaosSchedule.mixed(count=len(FAULT_KINDS), seed=0, full_world=3, checkpoint_every=5, node_ops=ops)
        assert sorted(f.kind for f in schedule.faults) == sorted(FAULT_KINDS)
    args = R.build_parser().parse_args(["--silent-for", "7", "--notice-warning", "12"])
    args.raytrain_faults, args.steps = 9, 100
    forwarded = R._forward_args(args)
    assert forwarded[forwarded.index("--silent-for") + 1] == "7.0"
    assert forwarded[forwarded.index("--notice-warning") + 1] == "12.0"


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_resume_rate_notice_reaches_the_watcher_of_the_nodes_provider(provider):
    """`ClusterNodes.notice` switches the notice on at that node's own fake server, where the provider's
    watcher (the one a worker there runs) reads it as a notice to leave; the other nodes' servers stay quiet."""
    from benchmarks import resume_rate as R
    from elastictrain.fleet.notices import make_watcher
    from elastictrain.testing.metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGcpMetadata

    nodes = R.ClusterNodes.__new__(R.ClusterNodes)
    nodes.notice_warning_s = 40.0
    fakes = {"aws": FakeAwsMetadata(), "gcp": FakeGcpMetadata(), "azure": FakeAzureMetadata()}
    try:
        nodes.servers = {f"n-{p}": fake for p, fake in fakes.items()}
        nodes.labels = {f"n-{p}": {"provider": p} for p in fakes}
        watchers = {p: make_watcher(p, fake.url) for p, fake in fakes.items()}
        assert all(w.poll() is None for w in watchers.values())
        warning = nodes.notice(f"n-{provider}")
        assert warning == (R.GCP_WARNING_S if provider == "gcp" else 40.0)
        notice = watchers[provider].poll()
        assert notice is not None and notice.leave and notice.provider == provider
        assert warning - 2 <= notice.warning_s <= warning + 1
        assert all(w.poll() is None for p, w in watchers.items() if p != provider)
    finally:
        for fake in fakes.values():
            fake.close()


def test_resume_rate_reports_each_kind_with_p95_goodput_and_cost():
    from benchmarks import resume_rate as R

    rows = [  # two notices (no step redone), one silent node (two redone), faults at t=10, 20, 30; end at 40
        {"kind": "notice", "time": 10.0, "resumed": True, "recovery_s": 1.0, "steps_redone": 0},
        {"kind": "silent_node", "time": 20.0, "resumed": True, "recovery_s": 1.9, "steps_redone": 2},
        {"kind": "notice", "time": 30.0, "resumed": True, "recovery_s": 3.0, "steps_redone": 0},
    ]
    firsts = {s: float(s) for s in range(40)}  # one new step a second: 10 per window
    good = R.goodput_by_kind(rows, firsts, end=40.0, step_s=0.5)
    assert good == {"notice": pytest.approx(0.5), "silent_node": pytest.approx(0.5)}
    s = R.summarise(rows, scheduled=3, total_steps=40, steps_done=40, finished=True, wall_s=40.0, step_s=0.5,
                    param_diff=None, steps_redone_total=2, first_commits=firsts, end=40.0, held_rate=1.2)
    notice = s["by_kind"]["notice"]
    assert notice["resume_rate"] == 1.0 and notice["steps_redone"] == 0
    assert notice["recovery_median_s"] == pytest.approx(2.0) and notice["recovery_p95_s"] == 3.0
    assert notice["cost_per_effective_gpu_hour"] == pytest.approx(1.2 / 0.5)
    assert s["cost_per_effective_gpu_hour"] == pytest.approx(1.2 / 0.5)  # 40 steps x 0.5 s over 40 s
    t = R.targets(s, heartbeat_timeout_s=1.5)
    assert t["all_resumed"] and t["notice_lost_no_step"] and t["silent_node_within_bound"]
    assert not R.targets({**s, "by_kind": {**s["by_kind"], "silent_node": {**s["by_kind"]["silent_node"],
                                                                             "recovery_median_s": 2.1}}},
                         heartbeat_timeout_s=1.5)["silent_node_within_bound"]
    report = {"command": "x", "config": {"workers": 3, "steps": 40, "faults": 3, "seed": 0, "ckpt_every": 10},
              "machine": {"cpus": 2, "loadavg_1_5_15": [1, 1, 1]},
              "arms": {"elastictrain": {"summary": {**s, "targets": t}, "faults": rows}}}
    text = R.markdown(report)
    assert "| notice | 2/2 | 2.00 s | 3.00 s | 0 | 50% | $2.40 |" in text and "silent-node recovery median 1.90 s" in text


def test_resume_rate_adds_nodes_off_the_main_thread_without_rays_sigterm_handler():
    """Ray's per-node SIGTERM handler raises off the main thread; the Ray Train arm's injector thread skips
    it while adding a node, and only there (the main thread keeps Ray's own, and it is put back after)."""
    import ray._private.utils as ray_utils

    from benchmarks import resume_rate as R

    original = ray_utils.set_sigterm_handler
    seen = {}

    def in_thread():
        with R._sigterm_handler_on_main_thread_only():
            seen["inside"] = ray_utils.set_sigterm_handler
            ray_utils.set_sigterm_handler(lambda *a: None)  # raises ValueError off the main thread unless skipped

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(10)
    assert seen["inside"] is not original and ray_utils.set_sigterm_handler is original
    with R._sigterm_handler_on_main_thread_only():
        assert ray_utils.set_sigterm_handler is original
