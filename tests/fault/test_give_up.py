"""The failure budget, end to end on a local Ray cluster: one loss past `max_failures` ends fit() with
TrainingFailed naming the cause, in bounded time, and leaves no worker holding resources."""

from __future__ import annotations

import pytest

import elastictrain as et
from elastictrain.testing.toy import ToyTask
from tests.conftest import _wait_for
from tests.fault.faults import At, kill_follower
from tests.toy_runs import FAILURE, fit_toy


def wait_until_released(ray, total_cpus: float, deadline_s: float = 30.0) -> float:
    """Poll until every CPU of the cluster is free again (the run's actors are gone); returns what is free."""
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= total_cpus, timeout=deadline_s, interval=0.1)
    return ray.available_resources().get("CPU", 0)


@pytest.mark.timeout(180)
def test_a_loss_past_max_failures_ends_the_run(ray_session):
    total = ray_session.cluster_resources()["CPU"]
    fault = At(4, kill_follower, min_members=3)
    task = ToyTask(total_steps=40)  # more than the run gets to: it holds at step 5 until the kill, then must fail
    with pytest.raises(et.TrainingFailed, match=r"1 workers lost, more than max_failures=0") as failed:
        fit_toy(task, workers=(2, 3), callbacks=[fault], failure=FAILURE.model_copy(update={"max_failures": 0}),
                hold_at=5)
    assert fault.fired_at is not None
    assert failed.value.cause is None  # no user code raised
    assert wait_until_released(ray_session, total) == total, "a worker actor still holds its CPU"
