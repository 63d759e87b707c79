"""Too few workers for too long, on a multi-node `ray.cluster_utils.Cluster`: a node is lost and no
capacity comes back, so after `below_min_timeout_s` fit() ends with TrainingFailed naming the cause,
and no worker actor (the pending replacement included) holds resources."""

from __future__ import annotations

import pytest

import elastictrain as et
from elastictrain.testing.toy import ToyTask
from tests.fault.faults import At
from tests.fault.test_cluster import AWS, _head, cluster, remove_a_followers_node  # noqa: F401 - fixtures used by name
from tests.fault.test_give_up import wait_until_released
from tests.toy_runs import FAILURE, fit_toy

pytestmark = pytest.mark.slow


@pytest.mark.timeout(180)
def test_below_min_workers_for_too_long_ends_the_run(cluster):
    import ray

    for _ in range(2):
        cluster.add_node(num_cpus=1, labels=AWS)
    cluster.wait_for_nodes()
    removed = []

    failure = FAILURE.model_copy(update={"below_min_timeout_s": 15.0})
    task = ToyTask(total_steps=40, step_sleep_s=0.02)  # more than the run gets to: it holds at step 5 for the fault
    with pytest.raises(et.TrainingFailed, match=r"fewer than min_workers=2") as failed:
        fit_toy(task, workers=(2, 2), callbacks=[At(4, lambda view: removed.append(remove_a_followers_node(cluster, view)), min_members=2)], failure=failure,
                hold_at=5)
    assert removed, "the node was never removed"
    assert "1 live worker(s) for 15s" in failed.value.reason and failed.value.cause is None
    # The replacement the driver asked for never found a node; it must not linger pending either.
    total = ray.cluster_resources().get("CPU", 0)
    assert total == 1
    assert wait_until_released(ray, total) == total, "a worker actor still holds its CPU"
