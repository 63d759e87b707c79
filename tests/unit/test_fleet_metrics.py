"""The run's metrics callback, fed hand-built events through a recording backend (no Ray)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from elastictrain.config import BatchConfig, RunConfig, ScalingConfig
from elastictrain.events import event
from elastictrain.fleet import metrics as fm
from elastictrain.fleet.metrics import METRICS, SPECS, RunMetrics, maybe_run_metrics
from elastictrain.fleet.sample_rate import SampleRate

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "elastictrain.json"


class Recorded:
    """One instrument: every call, with its tags."""

    def __init__(self, spec):
        self.spec = spec
        self.calls: list[tuple[str, float, dict]] = []

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Ray's counters refuse increments that are not positive"
        self.calls.append(("inc", value, dict(tags or {})))

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags or {})))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, dict(tags or {})))

    def total(self, **tags):
        return sum(v for op, v, t in self.calls if op == "inc" and all(t.get(k) == w for k, w in tags.items()))

    def last(self):
        sets = [v for op, v, _ in self.calls if op == "set"]
        return sets[-1] if sets else None

    def observed(self):
        return [v for op, v, _ in self.calls if op == "observe"]


class RecordingBackend:
    def __init__(self):
        self.made: dict[str, Recorded] = {}

    def make(self, spec):
        assert spec.kind in ("counter", "gauge", "histogram")
        self.made[spec.name] = Recorded(spec)
        return self.made[spec.name]


@dataclass
class View:
    step: int = -1
    world: list = field(default_factory=list)
    steps_redone: int = 0
    steps_lost_in_flight: int = 0

    def members(self):
        return {m: {"rank": i} for i, m in enumerate(self.world)}

    def latest_report(self):
        return {}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(run="r1", batch=32, spread=False):
    backend, clock = RecordingBackend(), Clock()
    return RunMetrics(run, batch, backend=backend, spread=spread, clock=clock), backend.made, clock


def test_a_run_of_events_updates_every_metric():
    cb, m, clock = make(batch=32)
    view = View(step=-1, world=["a", "b", "c"])
    cb.on_progress(view)
    assert m["elastictrain_committed_steps"].last() == 0 and m["elastictrain_world_size"].last() == 3
    assert m["elastictrain_samples_per_second"].last() is None  # one observation is no rate yet

    clock.now += 2.0
    view.step = 9  # 10 steps committed in 2 s at 32 samples each
    cb.on_progress(view)
    assert m["elastictrain_committed_steps"].last() == 10
    assert m["elastictrain_samples_per_second"].last() == pytest.approx(10 * 32 / 2.0)

    for e in [event("worker_lost", member="a", reason="ActorDiedError"),
              event("world_changed", term=1, step=10, reason="peer lost", in_flight=10),
              event("recovered", term=2, world_size=2, resumed_from=10, recovery_s=0.4),
              event("worker_lost", member="b", reason="ActorDiedError"),
              event("recovered", term=3, world_size=2, resumed_from=12, recovery_s=3.5),
              event("checkpoint", term=3, step=12, bytes_written=1000, seconds=0.2),
              event("checkpoint", term=3, step=14, bytes_written=0, seconds=0.01),  # nothing changed: no bytes
              event("preemption_notice", term=3, step=13),
              event("fault_injected", member="c")]:
        cb.on_event(view, e)
    view.world, view.steps_redone, view.steps_lost_in_flight = ["c", "d"], 2, 1
    cb.on_progress(view)
    view.steps_redone = 5
    cb.on_progress(view)
    cb.on_progress(view)  # nothing new: counters stay

    assert m["elastictrain_workers_lost"].total() == 2
    assert m["elastictrain_recoveries"].total() == 2
    assert m["elastictrain_recovery_seconds"].observed() == [0.4, 3.5]
    assert m["elastictrain_checkpoint_bytes"].total() == 1000
    assert m["elastictrain_checkpoint_seconds"].observed() == [0.2, 0.01]
    assert m["elastictrain_notices"].total(kind="preemption_notice") == 1
    assert m["elastictrain_steps_redone"].total() == 5
    assert m["elastictrain_steps_lost_in_flight"].total() == 1
    assert m["elastictrain_world_size"].last() == 2
    assert m["elastictrain_spread_compliant"].calls == []  # no spread asked for: unset
    # every call of every metric carries the run's name
    assert all(tags["run"] == "r1" for inst in m.values() for _, _, tags in inst.calls)


def test_samples_per_second_restart_after_a_restore_and_fall_in_a_stall():
    rate = SampleRate(global_batch_size=10, window_s=4.0)
    assert rate.observe(0, now=0.0) is None
    assert rate.observe(8, now=2.0) == pytest.approx(40.0)
    assert rate.observe(8, now=4.0) == pytest.approx(20.0)  # a stall: nothing committed for 2 s
    assert rate.observe(8, now=8.0) == pytest.approx(0.0)  # the window holds the stall only
    assert rate.observe(3, now=9.0) is None  # restored from an older checkpoint: a new window
    assert rate.observe(5, now=10.0) == pytest.approx(20.0)


def test_spread_compliance_follows_the_spread_events_when_the_vocabulary_has_them(monkeypatch):
    kinds = dict(fm.KINDS)
    from elastictrain.events import EventKind

    kinds["spread_unmet"] = EventKind("driver", (), "test")
    kinds["spread_restored"] = EventKind("driver", (), "test")
    monkeypatch.setattr(fm, "KINDS", kinds)
    cb, m, _ = make(spread=True)
    assert m["elastictrain_spread_compliant"].last() == 1.0
    cb.on_event(View(), {"kind": "spread_unmet", "time": 1.0})
    assert m["elastictrain_spread_compliant"].last() == 0.0
    cb.on_event(View(), {"kind": "spread_restored", "time": 2.0})
    assert m["elastictrain_spread_compliant"].last() == 1.0
    cb.on_event(View(), {"kind": "cloud_notice", "time": 3.0})
    assert m["elastictrain_notices"].total(kind="cloud_notice") == 1


def test_spread_gauge_stays_unset_without_the_spread_events(monkeypatch):
    monkeypatch.setattr(fm, "KINDS", {k: v for k, v in fm.KINDS.items() if not k.startswith("spread_")})
    cb, m, _ = make(spread=True)
    cb.on_event(View(), {"kind": "spread_unmet", "time": 1.0})
    assert m["elastictrain_spread_compliant"].calls == []


class _Spec:
    def __init__(self, metrics=True):
        self.run_id = "r9"
        self.run = RunConfig(metrics=metrics)
        self.batch = BatchConfig(global_batch_size=16, micro_batch_size=4)
        self.scaling = ScalingConfig()


def test_metrics_are_on_by_default_and_off_on_request():
    assert RunConfig().metrics is True
    assert maybe_run_metrics(_Spec(metrics=False), backend=RecordingBackend()) == []
    [cb] = maybe_run_metrics(_Spec(), backend=RecordingBackend())
    assert cb.run == "r9"


def test_without_ray_metrics_a_warning_once_and_no_metrics(caplog):
    class Missing:
        def make(self, spec):
            raise ImportError("No module named 'ray.util.metrics'")

    fm._warn_unavailable.cache_clear()
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        assert maybe_run_metrics(_Spec(), backend=Missing()) == []
        assert maybe_run_metrics(_Spec(), backend=Missing()) == []
    assert sum("live metrics are off" in r.getMessage() for r in caplog.records) == 1


def test_a_failing_backend_never_stops_the_run(caplog):
    cb, m, _ = make()

    def broken(*a, **k):
        raise RuntimeError("exporter gone")

    m["elastictrain_committed_steps"].set = broken
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        cb.on_progress(View(step=3))
        cb.on_progress(View(step=4))
        cb.on_event(View(), event("worker_lost", member="a", reason="x"))
    assert sum("recording metrics failed" in r.getMessage() for r in caplog.records) == 1
    assert m["elastictrain_workers_lost"].calls == []


def test_names_are_prefixed_and_exported_as_prometheus_shows_them():
    assert all(s.name.startswith("elastictrain_") and "run" in s.tag_keys for s in METRICS)
    assert SPECS["elastictrain_workers_lost"].exported() == ["ray_elastictrain_workers_lost_total"]
    assert SPECS["elastictrain_recovery_seconds"].exported()[1] == "ray_elastictrain_recovery_seconds_count"


def test_the_grafana_dashboard_queries_exactly_the_exported_metrics():
    board = json.loads(DASHBOARD.read_text())
    assert any(v.get("type") == "datasource" and v.get("query") == "prometheus"
               for v in board["templating"]["list"]), "the Prometheus data source is a variable"
    exprs, sources = [], []
    for panel in board["panels"]:
        sources.append(panel.get("datasource", {}).get("uid"))
        exprs += [t["expr"] for t in panel.get("targets", [])]
    assert exprs and set(sources) == {"${datasource}"}
    queried = set(re.findall(r"\bray_elastictrain_[a-z_]+", " ".join(exprs)))
    exported = {name for spec in METRICS for name in spec.exported()}
    assert queried <= exported, f"the dashboard queries series no metric exports: {sorted(queried - exported)}"
    shown = {spec.name for spec in METRICS if set(spec.exported()) & queried}
    assert shown == set(SPECS), f"metrics without a panel: {sorted(set(SPECS) - shown)}"
