"""A run's live metrics, scraped from Ray's own metrics endpoint during and after the run."""

from __future__ import annotations

import socket
import threading
import urllib.request
import uuid

import pytest

import elastictrain as et
from elastictrain.runtime.cluster import LOCAL_START_TRIES
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.conftest import _wait_for
from tests.fault.faults import kill_follower
from tests.toy_runs import BATCH, FAILURE

parser = pytest.importorskip("prometheus_client.parser")

TASK = ToyTask(total_steps=20, step_sleep_s=0.05)
FAULT_STEP = 6
WORKERS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    """A Ray session of its own whose metrics agent exports on a free local port, every half second
    (Ray's default is 10 s); the shared session exports none."""
    import ray

    port = _free_port()
    for attempt in range(1, LOCAL_START_TRIES + 1):  # as `ensure_ray`: a busy machine may miss Ray's 30 s
        try:
            ray.init(address="local", num_cpus=WORKERS + 2, include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False, _metrics_export_port=port,
                     _system_config={"metrics_report_interval_ms": 500})
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_TRIES:
                raise
    try:
        yield port
    finally:
        ray.shutdown()


def scrape(port: int, run: str) -> dict[str, float]:
    """This run's elastictrain series on the endpoint: name (with `kind` for notices, `le` for buckets) -> value."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_elastictrain_") and sample.labels.get("run") == run:
                extra = "".join(f"[{k}={sample.labels[k]}]" for k in ("kind", "le") if k in sample.labels)
                out[sample.name + extra] = out.get(sample.name + extra, 0.0) + sample.value
    return out


class KillOnceScraped:
    """Kills a follower at FAULT_STEP of a whole world, but only once the scraper saw the run's metrics
    mid-run: the loop holds at the next step until the fault fired, so the run cannot end first."""

    def __init__(self, seen: threading.Event) -> None:
        self.seen = seen
        self.fired = False

    def on_progress(self, view) -> None:
        if (not self.fired and self.seen.is_set() and view.step >= FAULT_STEP
                and len(view.members()) >= WORKERS):
            self.fired = True
            kill_follower(view)


def test_a_runs_metrics_appear_on_rays_endpoint_with_sane_values(metrics_port):
    run = f"metrics-{uuid.uuid4().hex[:6]}"
    seen_mid_run, stop = threading.Event(), threading.Event()
    mid_run: list[dict] = []

    def scraper():
        while not stop.is_set():
            got = scrape(metrics_port, run)
            if got.get("ray_elastictrain_committed_steps", 0) >= 1 and got.get("ray_elastictrain_world_size") == WORKERS:
                mid_run.append(got)
                seen_mid_run.set()
                return
            stop.wait(0.2)

    thread = threading.Thread(target=scraper, name="metrics-scraper")
    thread.start()
    try:
        result = et.ElasticTrainer(
            make_train_fn(TASK, on_step=hold_until_faults(FAULT_STEP + 1)),
            scaling=et.ScalingConfig(min_workers=WORKERS - 1, max_workers=WORKERS),
            batch=BATCH,
            failure=FAILURE.model_copy(update={"startup_wait_s": 120.0}),
            run=et.RunConfig(name=run),
            callbacks=[KillOnceScraped(seen_mid_run)],
        ).fit()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert mid_run, "the run's metrics never appeared on Ray's endpoint during the run"
    assert 1 <= mid_run[0]["ray_elastictrain_committed_steps"] < TASK.total_steps

    assert result.steps == TASK.total_steps
    injected = sum(1 for e in result.events if e["kind"] == "fault_injected")
    assert injected == 1 and result.failures == 1

    # Ray exports what the driver recorded last within one report interval.
    final: dict[str, float] = {}

    def settled() -> bool:
        final.clear()
        final.update(scrape(metrics_port, run))
        return (final.get("ray_elastictrain_committed_steps") == result.steps
                and final.get("ray_elastictrain_recoveries_total", 0) >= len(result.recoveries)
                and "ray_elastictrain_workers_lost_total" in final)

    assert _wait_for(settled, timeout=30, interval=0.25), f"metrics did not settle: {final}"
    last_world = [e for e in result.events if e["kind"] == "world"][-1]
    assert final["ray_elastictrain_world_size"] == last_world["world_size"]
    assert final["ray_elastictrain_workers_lost_total"] == injected
    recoveries = final["ray_elastictrain_recoveries_total"]
    assert recoveries == len(result.recoveries) >= 1
    assert final["ray_elastictrain_recovery_seconds_count"] == recoveries
    slowest = max(e["recovery_s"] for e in result.recoveries)
    assert final["ray_elastictrain_recovery_seconds_bucket[le=+Inf]"] == recoveries
    # Ray keeps bucket counts exactly (its sum is approximate): no recovery lies above the slowest one's bucket.
    bounds = sorted(float(k.split("le=")[1].rstrip("]")) for k in final
                    if k.startswith("ray_elastictrain_recovery_seconds_bucket[") and "+Inf" not in k)
    above = [b for b in bounds if b >= slowest]
    if above:
        assert final[f"ray_elastictrain_recovery_seconds_bucket[le={above[0]}]"] == recoveries
    assert final["ray_elastictrain_samples_per_second"] > 0
    assert final.get("ray_elastictrain_steps_redone_total", 0) == result.steps_redone
