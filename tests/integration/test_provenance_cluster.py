"""A checkpoint's manifest names who produced its steps, on a cluster of two providers, as an auditor reads it.

A local `ray.cluster_utils.Cluster` starts with one labelled "aws" node that has a fake EC2 metadata
server (its own address through the node's environment); a node of another provider, whose cloud offers
no identity, is added mid-run and its worker joins at a step boundary. The AWS member holds the state and
leads throughout, so it writes every checkpoint. `elastictrain ckpt ls --json` must list, for each
checkpoint, the members of each term with their labels, step ranges and sample positions that together
cover exactly the steps since the previous checkpoint, and the AWS node's attestation with its key id.
"""

from __future__ import annotations

import json

import pytest

import elastictrain as et
from elastictrain.checkpoint.provenance import attestation_digest, expand_positions
from elastictrain.cli import main
from elastictrain.fleet.notice_watch import ENDPOINT_ENV
from elastictrain.fleet.notices import make_watcher
from elastictrain.fleet.report_log import read_events
from elastictrain.testing.faults import hold_for_whole_world
from elastictrain.testing.metadata import FakeAwsMetadata
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.fault.faults import At
from tests.toy_runs import BATCH, FAILURE

pytestmark = pytest.mark.slow

LABELS = {
    "aws": {"provider": "aws", "region": "us-east-1", "zone": "us-east-1a", "instance_type": "p4d.24xlarge",
            "accelerator": "A100"},
    "lambda": {"provider": "lambda", "region": "us-west-3", "zone": "us-west-3b", "instance_type": "gpu_1x_h100",
               "accelerator": "H100"},
}


@pytest.fixture
def aws():
    with FakeAwsMetadata(region="us-east-1") as server:
        yield server


@pytest.fixture
def cluster(aws):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        aws_node = c.add_node(num_cpus=1, labels=LABELS["aws"], env_vars={ENDPOINT_ENV: aws.url})
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        yield c, aws_node
    finally:
        ray.shutdown()
        c.shutdown()


def test_manifests_name_every_member_its_steps_and_samples_and_the_aws_attestation(cluster, aws, tmp_path, capsys):  # noqa: E501
    cluster, aws_node = cluster
    task = ToyTask(total_steps=12)
    uri = f"file://{tmp_path}/run"
    empty_dmi = tmp_path / "dmi"  # whatever cloud this machine is on, only the labels say which node is where
    empty_dmi.mkdir()
    notices = et.NoticeConfig(poll_interval_s=0.5, dmi_root=str(empty_dmi))
    nodes = {}
    grow = At(1, lambda view: nodes.setdefault("lambda", cluster.add_node(num_cpus=1, labels=LABELS["lambda"])))
    result = et.ElasticTrainer(
        make_train_fn(task, on_step=hold_for_whole_world([3], workers=2)),  # step 3 waits for the new worker
        scaling=et.ScalingConfig(min_workers=1, max_workers=2, allowed_regions=["us-east-1", "us-west-3"]),
        batch=BATCH,
        checkpoint=et.CheckpointConfig(uri=uri, every_steps=4, keep_last=10),
        failure=FAILURE.model_copy(update={"notices": notices, "startup_wait_s": 120.0}),
        network=et.NetworkConfig(private=True),  # two providers: the test's nodes share one machine
        callbacks=[grow],
    ).fit()

    capsys.readouterr()
    assert main(["ckpt", "ls", "--json", uri]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # a save at step 4 races the world growing at that boundary: the new term's fence may refuse it
    saved = [c["step"] for c in listed]
    assert saved in ([4, 8, 12], [8, 12]), (saved, [e for e in result.events if e["kind"] == "checkpoint_failed"])
    assert aws.count("/latest/dynamic/instance-identity/document") == 1  # fetched once, at the worker's start
    digest = attestation_digest(make_watcher("aws", aws.url).fetch_identity())  # what the node was given
    node_ids = {"aws": aws_node.node_id, "lambda": nodes["lambda"].node_id}
    joined = [e for e in read_events(f"{uri}/events").events if e["kind"] == "joined"]  # the run's event log
    ranks = {t: [e["node_id"] for e in sorted((e for e in joined if e["term"] == t), key=lambda e: e["rank"])]
             for t in {e["term"] for e in joined}}
    members_of = {t: [e["member"] for e in sorted((e for e in joined if e["term"] == t), key=lambda e: e["rank"])]
                  for t in ranks}
    previous = 0
    for ckpt in listed:
        lineage = ckpt["lineage"]
        assert (lineage["from_step"], lineage["to_step"], lineage["complete"]) == (previous, ckpt["step"], True)
        assert lineage["gaps"] == []
        members = {m["node"]: m for t in lineage["terms"] for m in t["members"]}
        # each term lists the members that joined it, by rank, as the run's own events tell
        for t in lineage["terms"]:
            assert [m["node"] for m in t["members"]] == ranks[t["term"]], (t, ranks)
            assert [m["member"] for m in t["members"]] == members_of[t["term"]]
        expected = {name for name, node in node_ids.items() if node in members}
        assert "aws" in expected
        for name in expected:
            m = members[node_ids[name]]
            assert {k: m[k] for k in LABELS[name]} == LABELS[name]
            assert m["host"] and m["member"]
        # the terms' step ranges tile [previous, step) and the members' positions tile each step's G samples
        steps = sorted(s for t in lineage["terms"] for s in range(*t["steps"]))
        assert steps == list(range(previous, ckpt["step"]))
        g = BATCH.global_batch_size
        positions = sorted(p for t in lineage["terms"] for m in t["members"]
                           for lo, hi in expand_positions(m["positions"]) for p in range(lo, hi))
        assert positions == list(range(previous * g, ckpt["step"] * g))
        # the AWS node's signed identity: in full for the saver, as a digest for each member
        aws_member = members[node_ids["aws"]]
        assert aws_member["attestation"] == digest
        if "lambda" in expected:
            assert members[node_ids["lambda"]]["attestation"] == ""  # its cloud gave none: nothing invented
        assert ckpt["provenance"]["node"] == node_ids["aws"]
        att = ckpt["attestation"]
        assert att["provider"] == "aws" and att["document"] == aws.document and att["digest"] == digest
        assert att["key_id"] == "aws-instance-identity:us-east-1" and "key" not in att
        previous = ckpt["step"]
    assert {m["node"] for t in listed[-1]["lineage"]["terms"] for m in t["members"]} == set(node_ids.values())
    assert main(["ckpt", "ls", uri]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == len(listed) and all("aws/us-east-1 by" in row and row.endswith("attested") for row in rows)
    assert "(aws/us-east-1, lambda/us-west-3)" in rows[-1]
