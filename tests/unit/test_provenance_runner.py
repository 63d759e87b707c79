"""The runtime's side of provenance and jurisdiction, without Ray: the leader's saves carry the lineage of
their steps and its attestation; a world with a member outside the allowed regions is refused."""

from __future__ import annotations

import json

import pytest

from elastictrain.checkpoint.catalog import describe_checkpoints
from elastictrain.config import ScalingConfig
from elastictrain.election.term import Member, WorldPlan
from elastictrain.errors import TrainingFailed
from elastictrain.fleet.attestation import attestation_record
from elastictrain.runtime.world import WorldInfo
from tests.unit.test_runner_saves import _leader, _state

IDENTITY = {"provider": "aws", "document": json.dumps({"region": "eu-west-1"}), "signature": "c2ln", "pkcs7": "cA=="}


def test_the_leaders_saves_carry_the_steps_since_the_last_one_and_its_attestation():
    runner, election = _leader()
    runner.attestation = attestation_record(IDENTITY)
    runner._checkpoints.attestation = runner.attestation
    runner.node = {"node_id": "n0", "host": "10.0.0.1", "labels": {"provider": "aws", "region": "eu-west-1"}}
    election.join(1, Member("m0", 0.0, node_id="n0", host="10.0.0.1", attestation=runner.attestation["digest"]))
    plan = WorldPlan(term=1, leader="m0", members=("m0",), steps=(0,), host="h", port=1,
                     labels=({"provider": "aws", "region": "eu-west-1"},))
    world = WorldInfo.from_plan(plan, "m0")
    runner._note_term(plan)
    for step in range(4):
        runner.on_commit(_state(step + 1), world, step)
    assert runner._save(_state(4), world, wait=True) is None
    for step in range(4, 7):
        runner.on_commit(_state(step + 1), world, step)
    assert runner._save(_state(7), world, wait=True) is None
    infos = describe_checkpoints(runner._checkpoints.storage)
    assert [i.step for i in infos] == [4, 7]
    first, second = (i.lineage for i in infos)
    assert (first["from_step"], first["to_step"], first["complete"]) == (0, 4, True)
    assert (second["from_step"], second["to_step"], second["complete"]) == (4, 7, True)  # since the last save
    (member,) = second["terms"][0]["members"]
    assert (member["node"], member["host"], member["region"]) == ("n0", "10.0.0.1", "eu-west-1")
    assert member["attestation"] == runner.attestation["digest"]
    assert member["positions"] == {"start": 4 * 8, "stop": 5 * 8, "stride": 8, "count": 3}
    assert infos[1].attestation == runner.attestation


def test_a_world_with_a_member_outside_the_allowed_regions_is_refused_at_its_start():
    runner, election = _leader()
    runner.spec = runner.spec.__class__(**{**runner.spec.__dict__,
                                           "scaling": ScalingConfig(allowed_regions=["eu-west-1"])})
    inside = WorldPlan(term=1, leader="m0", members=("m0",), steps=(0,), host="h", port=1,
                       labels=({"region": "eu-west-1"},))
    runner._refuse_outside_jurisdiction(inside)
    outside = WorldPlan(term=2, leader="m0", members=("m0", "m1"), steps=(0, 0), host="h", port=1,
                        labels=({"region": "eu-west-1"}, {"region": "us-east-1"}))
    with pytest.raises(TrainingFailed, match="m1 \\(region 'us-east-1'\\)"):
        runner._refuse_outside_jurisdiction(outside)
    assert election.outcome().startswith("failed:jurisdiction")
    assert any(e["kind"] == "error" and "allowed_regions" in e["reason"] for e in runner.sent)
