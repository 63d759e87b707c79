"""Multi-node faults on a local `ray.cluster_utils.Cluster` whose nodes carry provider/region labels."""

from __future__ import annotations

import time

import pytest

import elastictrain as et
from elastictrain.testing.faults import hold_for_whole_world
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.fault.faults import At, a_follower
from tests.fault.test_give_up import wait_until_released
from tests.toy_runs import BATCH, assert_matches_one_process, fit_toy
from tests.toy_runs import FAILURE as BASE_FAILURE

pytestmark = pytest.mark.slow

# Workers that cannot be placed stay pending: the first world should not wait long for them.
FAILURE = BASE_FAILURE.model_copy(update={"startup_wait_s": 1.0})
TASK = ToyTask(total_steps=16, step_sleep_s=0.08)
AWS = {"provider": "aws", "region": "us-east-1"}
GCP = {"provider": "gcp", "region": "europe-west4"}


@pytest.fixture(scope="module")
def _head():
    """One head node (no CPUs: workers run only on the labelled nodes a test adds) for the module."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        },
    )
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def cluster(_head):
    """The module's head with the nodes this test adds; they are removed when it ends."""
    try:
        yield _head
    finally:
        for node in list(_head.worker_nodes):
            _head.remove_node(node, allow_graceful=False)


class NodeWatch:
    """Records every node a world member ran on."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()

    def on_progress(self, view) -> None:
        self.nodes |= {info["node_id"] for info in view.members().values()}


def _node_of(cluster, node_id: str):
    return next(n for n in cluster.list_all_nodes() if n.node_id == node_id)


def remove_a_followers_node(cluster, view) -> str:
    """Remove (ungracefully) the node a follower runs on and record the fault; returns the node id."""
    member = a_follower(view)
    node_id = view.members()[member]["node_id"]
    cluster.remove_node(_node_of(cluster, node_id), allow_graceful=False)
    view.note_fault(member, node_removed=node_id)
    return node_id


def _fit(callbacks, *, workers, label_selector=None, task=TASK, hold_at=None, on_step=None) -> et.Result:
    return fit_toy(task, workers=workers, callbacks=callbacks, failure=FAILURE, label_selector=label_selector,
                   hold_at=hold_at, on_step=on_step)


def hold_until_a_member_is_lost(at_step: int, timeout_s: float = 120.0):
    """An `on_step`: at `at_step` of the first world, every rank holds until the driver noted a fault and saw
    a member of this world die. A removed node's workers die some time after the removal returns; without
    this the world could finish its steps with them first."""

    def on_step(ctx, step: int) -> None:
        if step != at_step or ctx.term != 1:
            return
        session = ctx._session
        session.wait_for_faults(1, timeout_s)
        runner, members = session.runner, set(session.world.plan.members)
        deadline = time.monotonic() + timeout_s
        while not runner.election.deaths() & members and time.monotonic() < deadline:
            runner.stopping.wait(0.02)

    return on_step


def _assert_same_model(result: et.Result, task: ToyTask = TASK) -> None:
    assert_matches_one_process(result, task)


def _world_sizes(result: et.Result) -> list[int]:
    return [e["world_size"] for e in result.events if e["kind"] == "world"]


class RecordHub:
    """Where the run's hub runs, looked up at the run's first event (a worker started), before any step."""

    def __init__(self) -> None:
        self.node_id = None

    def on_progress(self, view):
        pass

    def on_event(self, view, event):
        import ray

        if self.node_id is None:
            hub = view._driver.workers.hub
            self.node_id = ray.get(hub.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def test_whole_node_lost_and_workers_stay_on_their_provider(cluster):
    aws = [cluster.add_node(num_cpus=1, labels=AWS) for _ in range(3)]
    gcp = cluster.add_node(num_cpus=1, labels=GCP)
    cluster.wait_for_nodes()
    watch = NodeWatch()
    hub = RecordHub()
    removed: list[str] = []

    fault = At(8, lambda view: removed.append(remove_a_followers_node(cluster, view)), min_members=3)
    result = _fit([watch, fault, hub], workers=(2, 3), label_selector={"provider": "aws"}, hold_at=9,
                  on_step=hold_until_a_member_is_lost(9))
    assert removed and any(e["kind"] == "worker_lost" for e in result.events)
    # losing a worker node never takes the run's own bookkeeping with it: the hub runs on the driver's node
    assert hub.node_id == cluster.head_node.node_id
    assert gcp.node_id not in watch.nodes, "a worker ran on a node the label selector excludes"
    assert watch.nodes <= {n.node_id for n in aws}
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_capacity_added_mid_run_scales_up(cluster):
    for _ in range(2):
        cluster.add_node(num_cpus=1, labels=AWS)
    cluster.wait_for_nodes()
    task = ToyTask(total_steps=12, step_sleep_s=0.02)
    grow = At(3, lambda view: cluster.add_node(num_cpus=1, labels=AWS), min_members=2)
    result = et.ElasticTrainer(
        make_train_fn(task, on_step=hold_for_whole_world([6], workers=3)),
        scaling=et.ScalingConfig(min_workers=2, max_workers=3), batch=BATCH, failure=FAILURE, callbacks=[grow],
    ).fit()
    sizes = _world_sizes(result)
    assert sizes[0] == 2 and sizes[-1] == 3, sizes
    assert not any(e["kind"] == "worker_lost" for e in result.events)
    assert result.steps_redone == 0 and result.steps_lost_in_flight == 0  # growing at a step boundary costs no step
    _assert_same_model(result, task)


class LoseANodeThenGetOneBack:
    """At `step`, remove a follower's node; `wait_s` later, add a node back (on the driver's thread)."""

    def __init__(self, cluster, step: int, wait_s: float) -> None:
        self.cluster, self.step, self.wait_s = cluster, step, wait_s
        self.fired_at = None
        self.added_at = None

    def on_progress(self, view) -> None:
        if self.fired_at is None and view.step >= self.step and len(view.members()) >= 2:
            remove_a_followers_node(self.cluster, view)
            self.fired_at = time.time()
        elif self.fired_at is not None and self.added_at is None and time.time() - self.fired_at >= self.wait_s:
            self.cluster.add_node(num_cpus=1, labels=AWS)
            self.added_at = time.time()


def test_below_min_workers_waits_then_continues(cluster):
    for _ in range(2):
        cluster.add_node(num_cpus=1, labels=AWS)
    cluster.wait_for_nodes()
    fault = LoseANodeThenGetOneBack(cluster, step=6, wait_s=3.0)
    result = _fit([fault], workers=(2, 2), hold_at=7, on_step=hold_until_a_member_is_lost(7))
    assert fault.added_at is not None
    later_worlds = [e for e in result.events if e["kind"] == "world" and e["time"] > fault.fired_at]
    assert later_worlds, "training never resumed"
    assert later_worlds[0]["time"] >= fault.added_at  # it waited for capacity, and did not fail meanwhile
    assert all(size == 2 for size in _world_sizes(result))
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_draining_node_worker_leaves_cleanly(cluster):
    import ray
    from ray.core.generated import autoscaler_pb2

    for _ in range(4):
        cluster.add_node(num_cpus=1, labels=AWS)
    cluster.wait_for_nodes()

    def drain(view):
        member = a_follower(view)
        node_id = view.members()[member]["node_id"]
        gcs = ray._raylet.GcsClient(address=cluster.address)
        accepted, _ = gcs.drain_node(
            node_id,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot notice",
            int(time.time() * 1000) + 120_000,
        )
        assert accepted

    class ReleaseOnceSeen:
        """The loop holds until the driver has seen the drain and asked the member to leave."""

        def on_progress(self, view):
            pass

        def on_event(self, view, event):
            if event["kind"] == "node_draining":
                view.note_fault(event["member"], drained=event["node"])

    result = _fit([At(8, drain, min_members=3), ReleaseOnceSeen()], workers=(2, 3), hold_at=9)
    kinds = [e["kind"] for e in result.events]
    assert "node_draining" in kinds and "worker_left" in kinds
    assert "worker_lost" not in kinds
    assert result.steps_redone == 0
    _assert_same_model(result)


def test_a_world_across_providers_needs_a_private_network_or_the_opt_in(cluster):
    cluster.add_node(num_cpus=1, labels=AWS)
    cluster.add_node(num_cpus=1, labels=GCP)
    cluster.wait_for_nodes()
    task = ToyTask(total_steps=4)

    def fit(network: et.NetworkConfig) -> et.Result:
        return et.ElasticTrainer(make_train_fn(task), scaling=et.ScalingConfig(min_workers=2, max_workers=2),
                                 batch=BATCH, failure=FAILURE, network=network).fit()

    with pytest.raises(et.TrainingFailed) as refused:
        fit(et.NetworkConfig())
    message = str(refused.value)
    assert "provider: aws, gcp" in message and "region: europe-west4, us-east-1" in message
    for way_out in ("NetworkConfig(interface=", "NetworkConfig(private=True)", "NetworkConfig(allow_plaintext=True)"):
        assert way_out in message
    result = fit(et.NetworkConfig(allow_plaintext=True))
    assert result.steps == task.total_steps


@pytest.mark.timeout(180)
def test_below_min_workers_for_too_long_ends_the_run(cluster):
    """A node is lost and no capacity comes back: after `below_min_timeout_s` fit() ends with TrainingFailed
    naming the cause, and no worker actor (the pending replacement included) holds resources."""
    import ray

    for _ in range(2):
        cluster.add_node(num_cpus=1, labels=AWS)
    cluster.wait_for_nodes()
    removed = []

    failure = BASE_FAILURE.model_copy(update={"below_min_timeout_s": 5.0})
    task = ToyTask(total_steps=40, step_sleep_s=0.02)  # more than the run gets to: it holds at step 5 for the fault
    with pytest.raises(et.TrainingFailed, match=r"fewer than min_workers=2") as failed:
        fit_toy(task, workers=(2, 2), callbacks=[At(4, lambda view: removed.append(remove_a_followers_node(cluster, view)), min_members=2)], failure=failure,
                hold_at=5, on_step=hold_until_a_member_is_lost(5))
    assert removed, "the node was never removed"
    assert "1 live worker(s) for 5s" in failed.value.reason and failed.value.cause is None
    # The replacement the driver asked for never found a node; it must not linger pending either.
    total = ray.cluster_resources().get("CPU", 0)
    assert total == 1
    assert wait_until_released(ray, total) == total, "a worker actor still holds its CPU"
