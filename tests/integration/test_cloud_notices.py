"""A cloud's spot notice, read from a fake metadata server, leads to a save and a clean leave, with no step lost.

Three labelled nodes of a local `ray.cluster_utils.Cluster`, each given its own fake metadata server
through the node's environment (`env_vars` reach the raylet and the workers it starts):
ELASTICTRAIN_METADATA_ENDPOINT replaces the provider's address on that node only.
"""

from __future__ import annotations

import pytest

import elastictrain as et
from elastictrain.checkpoint import CheckpointManager
from elastictrain.fleet.notice_watch import ENDPOINT_ENV
from elastictrain.testing.metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGcpMetadata
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process

pytestmark = pytest.mark.slow

NOTICES = et.NoticeConfig(poll_interval_s=0.1, timeout_s=1.0)
WARNING_S = 120.0


class SpotNotice:
    """At `step`, with the whole world up, schedules a spot interruption on the AWS node's fake server; notes
    the fault once the member there reported the notice (the loop holds until then), and clears the
    notice so that a replacement placed on that node is not sent away too."""

    def __init__(self, step: int, aws: FakeAwsMetadata, aws_node: str) -> None:
        self.step, self.aws, self.aws_node = step, aws, aws_node
        self.member = None

    def on_progress(self, view) -> None:
        members = view.members()
        if self.member is None and view.step >= self.step and len(members) == 3:
            self.member = next(m for m, info in members.items() if info["node_id"] == self.aws_node)
            self.aws.interrupt("terminate", in_s=WARNING_S)

    def on_event(self, view, event) -> None:
        if event["kind"] == "cloud_notice" and event.get("member") == self.member and self.aws.action:
            self.aws.action = None
            view.note_fault(self.member, cloud_notice=event["notice"])


@pytest.fixture
def servers():
    aws, gcp, azure = FakeAwsMetadata(), FakeGcpMetadata(), FakeAzureMetadata()
    try:
        yield aws, gcp, azure
    finally:
        for server in (aws, gcp, azure):
            server.close()


@pytest.fixture
def cluster(servers):
    import ray
    from ray.cluster_utils import Cluster

    aws, gcp, azure = servers
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = {
            provider: c.add_node(num_cpus=1, labels={"provider": provider},
                                 env_vars={ENDPOINT_ENV: server.url})
            for provider, server in (("aws", aws), ("gcp", gcp), ("azure", azure))
        }
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        c.shutdown()


def test_a_spot_notice_saves_and_leaves_cleanly_with_no_step_lost(cluster, servers, tmp_path):
    aws, gcp, azure = servers
    task = ToyTask(total_steps=16, step_sleep_s=0.05)
    ckpt = et.CheckpointConfig(uri=f"file://{tmp_path}/run", every_steps=1000)
    notice = SpotNotice(6, aws, cluster["aws"].node_id)
    result = et.ElasticTrainer(
        make_train_fn(task, on_step=hold_until_faults(8)),  # the loop holds at step 8 until the notice was seen
        scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH,
        checkpoint=ckpt,
        failure=FAILURE.model_copy(update={"notices": NOTICES, "startup_wait_s": 120.0}),
        network=et.NetworkConfig(private=True),  # three providers: the test's nodes share one machine
        callbacks=[notice],
    ).fit()

    assert notice.member is not None
    seen = [e for e in result.events if e["kind"] == "cloud_notice"]
    assert [(e["member"], e["provider"], e["notice"]) for e in seen] == [(notice.member, "aws", "spot_terminate")]
    assert WARNING_S - 2 <= seen[0]["warning_s"] <= WARNING_S  # EC2 writes whole seconds
    left = next(e for e in result.events if e["kind"] == "left")
    assert left["member"] == notice.member and left["source"] == "aws"
    assert left["notice_s"] == pytest.approx(seen[0]["warning_s"])
    assert 0 < left["used_s"] < left["notice_s"]
    stop = next(e for e in result.events if e["kind"] == "preemption_notice")
    assert stop["source"] == "aws" and stop["step"] == left["step"]
    # the step the member left at was saved before it left, by the leader of that term (the run has one
    # writer: the leaving member itself when it leads, another one otherwise)
    saved = sorted(c.step for c in CheckpointManager(ckpt).list())
    assert left["step"] in saved and saved[-1] == task.total_steps
    leaders = {(e["term"], e["leader"]) for e in result.events if e["kind"] == "world"}
    saves = [(e["term"], e["member"], e["step"]) for e in result.events if e["kind"] == "checkpoint"]
    assert saves and all((term, member) in leaders for term, member, _ in saves)
    assert any(term == left["term"] and step == left["step"] for term, _, step in saves)
    # no step lost or redone: every step committed once, in order, and the model is the one-process one
    assert result.steps_redone == 0
    assert [s for _, s in result.commits] == list(range(task.total_steps))  # steps 0..15, each once, in order
    assert_matches_one_process(result, task)
    # every node polled its own server, and only the AWS one had anything to say
    assert aws.count("/latest/meta-data/spot/instance-action") > 0
    assert gcp.count("/computeMetadata/v1/instance/preempted") > 0
    assert azure.count("/metadata/scheduledevents") > 0
