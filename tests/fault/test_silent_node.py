"""A whole node that stops answering without closing a connection, as a reclaimed VM does.

Killed processes reset their TCP connections and peers fail at once; a machine that vanishes from
the network does not. Here every process of a node (its raylet, its workers, its agents) is
SIGSTOPped. The cluster keeps Ray's default node health checks, so it takes the node for dead only
much later: the run must find out from the worker's lapsed heartbeat, and rebuild without it.
"""

from __future__ import annotations

import pytest

from elastictrain.testing.faults import kill_node, silence_node
from elastictrain.testing.toy import ToyTask
from tests.fault.faults import At, a_follower
from tests.toy_runs import FAILURE as BASE_FAILURE
from tests.toy_runs import assert_matches_one_process, fit_toy

pytestmark = pytest.mark.slow

TASK = ToyTask(total_steps=16, step_sleep_s=0.05)
# A collective would wait a minute on the silent peer: only the heartbeat can explain a quick rebuild.
FAILURE = BASE_FAILURE.model_copy(update={"collective_timeout_s": 60.0, "startup_wait_s": 120.0})


@pytest.fixture
def silent_cluster():
    """A head without CPUs and three one-CPU nodes, with Ray's default node health checks."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(3):
            c.add_node(num_cpus=1, labels={"provider": "aws", "region": "us-east-1"})
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        for node in list(c.worker_nodes):
            kill_node(c, node)  # the silenced node's stopped processes too
        c.shutdown()


def test_a_silent_node_is_taken_for_lost_by_its_heartbeat_and_the_run_goes_on(silent_cluster):
    silenced = {}

    def silence_a_followers_node(view):
        member = a_follower(view)
        node_id = view.members()[member]["node_id"]
        node = next(n for n in silent_cluster.list_all_nodes() if n.node_id == node_id)
        silenced.update(member=member, pids=silence_node(node))
        view.note_fault(member, node=node_id, silenced=True)

    fault = At(8, silence_a_followers_node, min_members=3)
    result = fit_toy(TASK, workers=(2, 3), callbacks=[fault], failure=FAILURE)

    member = silenced["member"]
    assert len(silenced["pids"]) >= 2, "the node's raylet and its worker were not both stopped"
    events = result.events
    lapsed = [e for e in events if e["kind"] == "heartbeat_lapsed" and e["member"] == member]
    assert lapsed, "the silent worker's heartbeat lapse went unseen"
    changed = [e for e in events if e["kind"] == "world_changed" and e["time"] > fault.fired_at]
    assert changed, "no survivor left the world of the silent node"
    first_change = min(e["time"] for e in changed)
    # Nobody noticed before the heartbeat lapsed (no connection was closed: the node really went silent),
    # and the survivors rebuilt long before a collective would have timed out on it.
    assert first_change >= lapsed[0]["time"]
    assert first_change - fault.fired_at < FAILURE.collective_timeout_s
    assert any(e["kind"] == "recovered" and e["time"] > fault.fired_at for e in events)
    assert result.steps_redone <= 1
    assert_matches_one_process(result, TASK)
