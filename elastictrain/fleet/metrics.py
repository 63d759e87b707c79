"""Live Prometheus metrics of a run, kept on the driver from the run's one event stream.

`RunMetrics` is a driver callback (`on_progress(view)`, `on_event(view, event)`): it turns what the run
log sees into counters, gauges and histograms through `ray.util.metrics`, which Ray's metrics agent
exports on every node's metrics endpoint (`ray start --metrics-export-port`, or the port in
`ray.init(_metrics_export_port=...)`); Ray reports them every `metrics_report_interval_ms` (10 s by
default). Ray prefixes every name with `ray_` and Prometheus counters end in `_total`, so the counter
`elastictrain_workers_lost` is scraped as `ray_elastictrain_workers_lost_total`. Every metric carries the
tag `run` (the run's name). `RunConfig(metrics=False)` turns them off.

The arithmetic sits behind a small `MetricsBackend` seam, so it is tested without Ray.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

from elastictrain.events import KINDS, Event
from elastictrain.fleet.sample_rate import SampleRate

log = logging.getLogger(__name__)

RAY_PREFIX = "ray_"
"""What Ray's exporter puts before every application metric's name."""
NOTICE_KINDS = ("preemption_notice", "cloud_notice")
"""Event kinds counted as notices received (`cloud_notice` where the cloud watchers declare it)."""
SPREAD_UNMET, SPREAD_RESTORED = "spread_unmet", "spread_restored"

_RECOVERY_BOUNDS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
_SAVE_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name as recorded (before Ray's `ray_` prefix), kind, help text, extra tag keys."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tag_keys: tuple[str, ...] = ("run",)
    boundaries: tuple[float, ...] = ()

    def exported(self) -> list[str]:
        """The series names a Prometheus scrape of Ray's endpoint shows for it."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter":
            return [base + "_total"]
        if self.kind == "histogram":
            return [base + "_bucket", base + "_count", base + "_sum"]
        return [base]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("elastictrain_committed_steps", "gauge", "Optimizer steps committed (the state's step)."),
    MetricSpec("elastictrain_samples_per_second", "gauge",
               "Samples trained per second: committed steps x the global batch, over the last 10 s."),
    MetricSpec("elastictrain_world_size", "gauge", "Members of the newest world."),
    MetricSpec("elastictrain_workers_lost", "counter", "Worker processes that died or were killed."),
    MetricSpec("elastictrain_recoveries", "counter", "Rebuilt worlds that committed their first step."),
    MetricSpec("elastictrain_recovery_seconds", "histogram",
               "Seconds from a failure's detection to the rebuilt world's first committed step.",
               boundaries=tuple(_RECOVERY_BOUNDS)),
    MetricSpec("elastictrain_steps_redone", "counter",
               "Committed steps computed again after every replica of them was lost."),
    MetricSpec("elastictrain_steps_lost_in_flight", "counter",
               "Steps begun, not committed when their world changed, and computed again."),
    MetricSpec("elastictrain_checkpoint_bytes", "counter", "Bytes written by committed checkpoints."),
    MetricSpec("elastictrain_checkpoint_seconds", "histogram", "Seconds each committed checkpoint took to save.",
               boundaries=tuple(_SAVE_BOUNDS)),
    MetricSpec("elastictrain_notices", "counter",
               "Preemption notices received (SIGTERM, a draining node, a cloud's notice), by event kind.",
               tag_keys=("run", "kind")),
    MetricSpec("elastictrain_spread_compliant", "gauge",
               "1 while the placement spread (`ScalingConfig.spread_by`) is met, 0 while it is not; unset without one."),
)
SPECS: Mapping[str, MetricSpec] = {spec.name: spec for spec in METRICS}


class Instrument(Protocol):
    """What `RunMetrics` records through: the methods of `ray.util.metrics` Counter, Gauge and Histogram."""

    def inc(self, value: float = 1.0, tags: Optional[dict] = None) -> None: ...
    def set(self, value: float, tags: Optional[dict] = None) -> None: ...
    def observe(self, value: float, tags: Optional[dict] = None) -> None: ...


class MetricsBackend(Protocol):
    """Makes one instrument per metric (Ray's in a run; a recording fake in unit tests)."""

    def make(self, spec: MetricSpec) -> Instrument: ...


class RayMetricsBackend:
    """Instruments of `ray.util.metrics`, exported by Ray's metrics agent."""

    def __init__(self) -> None:
        from ray.util import metrics  # ImportError on a Ray without them: the caller warns and records nothing

        self._metrics = metrics

    def make(self, spec: MetricSpec) -> Instrument:
        m = self._metrics
        if spec.kind == "counter":
            return m.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        if spec.kind == "gauge":
            return m.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        return m.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                           tag_keys=spec.tag_keys)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value >= 0:
        return float(value)
    return None


class RunMetrics:
    """A driver callback keeping the run's Prometheus metrics (see the module's docstring for the names).

    Args:
        run: the run's name, the `run` tag of every metric.
        global_batch_size: samples per optimizer step (for samples per second).
        backend: where instruments come from; Ray's by default.
        spread: whether the run has a placement spread; the compliance gauge starts at 1 then (when
            `elastictrain.events.KINDS` has the spread events), and stays unset otherwise.
        clock: monotonic seconds (samples per second).
    """

    def __init__(self, run: str, global_batch_size: int, backend: Optional[MetricsBackend] = None,
                 spread: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        backend = backend if backend is not None else RayMetricsBackend()
        self.run = run
        self.clock = clock
        self._m = {spec.name: backend.make(spec) for spec in METRICS}
        self._tags = {"run": run}
        self._rate = SampleRate(global_batch_size)
        self._redone = 0
        self._in_flight = 0
        self._broken = False
        self._spread_known = SPREAD_UNMET in KINDS and SPREAD_RESTORED in KINDS
        if spread and self._spread_known:
            self._m["elastictrain_spread_compliant"].set(1.0, tags=self._tags)

    # --- the callback -------------------------------------------------------------------

    def on_progress(self, view) -> None:
        self._guarded(self._progress, view)

    def on_event(self, view, event: Event) -> None:
        self._guarded(self._event, event)

    # --- what each one records ------------------------------------------------------------

    def _progress(self, view) -> None:
        m, tags = self._m, self._tags
        committed = view.step + 1
        m["elastictrain_committed_steps"].set(float(committed), tags=tags)
        m["elastictrain_world_size"].set(float(len(view.members())), tags=tags)
        rate = self._rate.observe(committed, self.clock())
        if rate is not None:
            m["elastictrain_samples_per_second"].set(rate, tags=tags)
        redone, in_flight = view.steps_redone, view.steps_lost_in_flight
        if redone > self._redone:
            m["elastictrain_steps_redone"].inc(float(redone - self._redone), tags=tags)
            self._redone = redone
        if in_flight > self._in_flight:
            m["elastictrain_steps_lost_in_flight"].inc(float(in_flight - self._in_flight), tags=tags)
            self._in_flight = in_flight

    def _event(self, event: Event) -> None:
        m, tags = self._m, self._tags
        kind = event.get("kind")
        if kind == "worker_lost":
            m["elastictrain_workers_lost"].inc(1.0, tags=tags)
        elif kind == "recovered":
            m["elastictrain_recoveries"].inc(1.0, tags=tags)
            seconds = _number(event.get("recovery_s"))
            if seconds is not None:
                m["elastictrain_recovery_seconds"].observe(seconds, tags=tags)
        elif kind == "checkpoint":
            written, seconds = _number(event.get("bytes_written")), _number(event.get("seconds"))
            if written:  # Ray's counters take positive increments only
                m["elastictrain_checkpoint_bytes"].inc(written, tags=tags)
            if seconds is not None:
                m["elastictrain_checkpoint_seconds"].observe(seconds, tags=tags)
        elif kind in NOTICE_KINDS:
            m["elastictrain_notices"].inc(1.0, tags={**tags, "kind": kind})
        elif self._spread_known and kind in (SPREAD_UNMET, SPREAD_RESTORED):
            m["elastictrain_spread_compliant"].set(1.0 if kind == SPREAD_RESTORED else 0.0, tags=tags)

    def _guarded(self, record: Callable, arg: Any) -> None:
        """Metrics never stop a run: the first failure to record is logged and the metrics stop."""
        if self._broken:
            return
        try:
            record(arg)
        except Exception as exc:  # noqa: BLE001 - a metrics backend's failure is not the run's
            self._broken = True
            log.warning("run %s: recording metrics failed (%s: %s); no more metrics for this run",
                        self.run, type(exc).__name__, exc)


@functools.lru_cache(maxsize=None)
def _warn_unavailable(reason: str) -> None:
    log.warning("live metrics are off: ray.util.metrics is unavailable (%s); install ray[default]", reason)


def maybe_run_metrics(spec, backend: Optional[MetricsBackend] = None) -> list[RunMetrics]:
    """The run's metrics callback when `RunConfig.metrics` is on, as a list of zero or one; without
    `ray.util.metrics` a warning (once) and none.

    Args:
        spec: the run's `RunSpec`.
        backend: instruments' source; Ray's by default.
    """
    if not spec.run.metrics:
        return []
    try:
        return [RunMetrics(spec.run_id, spec.batch.global_batch_size, backend=backend,
                           spread=bool(getattr(spec.scaling, "spread_by", None)))]
    except Exception as exc:  # noqa: BLE001 - ImportError, or a Ray whose metrics refuse to build
        _warn_unavailable(f"{type(exc).__name__}: {exc}")
        return []
