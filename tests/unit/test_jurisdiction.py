"""The jurisdiction policy: config checks, the workers' Ray label selector, refusing a world or a bucket
outside it, the report's flags; and the attestation a worker fetches from its cloud."""

from __future__ import annotations

import pytest
from ray._private.label_utils import validate_label_selector

import elastictrain as et
from elastictrain.errors import OutsideJurisdiction
from elastictrain.fleet.attestation import fetch_attestation
from elastictrain.fleet.jurisdiction import check_bucket, region_selector, world_refusal
from elastictrain.fleet.report import compute
from elastictrain.fleet.report_prices import parse_prices
from elastictrain.runtime.policy import PlacementPolicy, with_region_policy
from elastictrain.testing.metadata import FakeAwsMetadata
from tests.unit.test_report import PRICES, two_runs

EU = ["eu-west-1", "europe-west4"]


@pytest.mark.parametrize("regions, message", [
    ([], "allows no region"),
    (["eu west"], "not a node label value"),
    (["x" * 70], "not a node label value"),
])
def test_a_bad_policy_is_refused_with_the_fix(regions, message):
    with pytest.raises(ValueError, match=message):
        et.ScalingConfig(allowed_regions=regions)
    with pytest.raises(ValueError, match=message):
        et.CheckpointConfig(uri="memory://x", allowed_regions=regions)


def test_a_label_selector_reaching_outside_the_policy_is_refused():
    with pytest.raises(ValueError, match="reaches outside allowed_regions"):
        et.ScalingConfig(allowed_regions=EU, label_selector={"region": "us-east-1"})
    with pytest.raises(ValueError, match="reaches outside allowed_regions"):
        et.ScalingConfig(allowed_regions=EU, label_selector={"region": "!us-east-1"})
    inside = et.ScalingConfig(allowed_regions=EU, label_selector={"region": "in(eu-west-1)", "provider": "aws"})
    assert region_selector(inside.allowed_regions, inside.label_selector) == {}  # the user's narrower one stays


def test_workers_get_a_region_selector_ray_accepts_composed_with_other_placement():
    scaling = et.ScalingConfig(max_workers=2, allowed_regions=["europe-west4", "eu-west-1"],
                               label_selector={"provider": "aws"})
    options = PlacementPolicy(scaling).actor_options()
    assert options["label_selector"] == {"provider": "aws", "region": "in(eu-west-1,europe-west4)"}
    assert validate_label_selector(options["label_selector"]) is None  # Ray's own syntax check
    other = with_region_policy({"num_cpus": 1, "label_selector": {"zone": "a"}}, scaling)
    assert other["label_selector"] == {"zone": "a", "region": "in(eu-west-1,europe-west4)"}
    assert "label_selector" not in PlacementPolicy(et.ScalingConfig(max_workers=2)).actor_options()
    # another placement's region entry (a spread over regions) is narrowed to the allowed ones it names
    spread = with_region_policy({"label_selector": {"region": "in(us-east-1,eu-west-1)"}}, scaling)
    assert spread["label_selector"] == {"region": "in(eu-west-1)"}
    outside = with_region_policy({"label_selector": {"region": "us-east-1"}}, scaling)
    assert outside["label_selector"] == {"region": "in(eu-west-1,europe-west4)"}


def test_a_world_with_a_member_outside_is_refused_with_who_and_where():
    assert world_refusal(["a", "b"], [{"region": "eu-west-1"}, {"region": "europe-west4"}], EU) is None
    assert world_refusal(["a"], [{}], None) is None
    reason = world_refusal(["a", "b", "c"], [{"region": "eu-west-1"}, {"region": "us-east-1"}, {}], EU)
    assert "2 member(s)" in reason and "b (region 'us-east-1')" in reason and "c (region unlabelled)" in reason
    assert "allowed_regions" in reason


def test_a_bucket_outside_or_of_unknown_region_is_refused_before_anything_runs():
    assert check_bucket(et.CheckpointConfig(uri="memory://b", allowed_regions=EU, bucket_region="eu-west-1")) \
        == "eu-west-1"
    with pytest.raises(OutsideJurisdiction, match="'us-east-1' .*outside"):
        check_bucket(et.CheckpointConfig(uri="memory://b", allowed_regions=EU, bucket_region="us-east-1"))
    with pytest.raises(OutsideJurisdiction, match="set CheckpointConfig.bucket_region"):
        check_bucket(et.CheckpointConfig(uri="memory://b", allowed_regions=EU))
    assert check_bucket(et.CheckpointConfig(uri="memory://b")) is None
    with pytest.raises(OutsideJurisdiction, match="outside"):  # fit() refuses before starting Ray
        et.ElasticTrainer(lambda ctx: None, checkpoint=et.CheckpointConfig(
            uri="memory://b", allowed_regions=EU, bucket_region="us-east-1")).fit()


def test_the_report_breaks_bytes_down_by_boundary_and_flags_what_the_policy_names():
    plain = compute(two_runs(), [], parse_prices(PRICES))
    assert plain["policy_violated"] is None and plain["policy_violations"] == []
    assert plain["bytes_across_boundaries_by"] == {"gcp/europe-west4->aws/us-east-1": 1_000_000_000,
                                                   "aws/us-west-2->aws/us-east-1": 500_000_000}
    assert sum(plain["bytes_across_boundaries_by"].values()) == plain["bytes_across_boundaries"]
    report = compute(two_runs(), [], parse_prices(PRICES), allowed_regions=["us-east-1", "europe-west4"])
    assert report["policy_violated"] is True
    workers = [(v["run"], v["term"], v["member"], v["region"]) for v in report["policy_violations"]
               if v["violation"] == "worker"]
    assert workers == [(0, 1, "c", "us-west-2"), (1, 1, "d", "us-west-2")]
    uploads = [(v["step"], v["from"], v["bytes"], v["outside"]) for v in report["policy_violations"]
               if v["violation"] == "checkpoint_upload"]
    assert uploads == [(21, "aws/us-west-2", 500_000_000, ["us-west-2"])]
    inside = compute(two_runs(), [], parse_prices(PRICES),
                     allowed_regions=["us-east-1", "europe-west4", "us-west-2"])
    assert inside["policy_violated"] is False


def test_a_worker_fetches_its_attestation_from_its_cloud_and_never_asks_off_cloud(tmp_path):
    with FakeAwsMetadata(region="eu-west-1") as aws:
        notices = et.NoticeConfig()
        record = fetch_attestation(notices, {"provider": "aws"}, environ={"ELASTICTRAIN_METADATA_ENDPOINT": aws.url})
        assert record["provider"] == "aws" and record["document"] == aws.document
        assert record["key_id"] == "aws-instance-identity:eu-west-1" and record["digest"].startswith("sha256:")
        assert aws.count("/latest/dynamic/instance-identity/document") == 1
        off = et.NoticeConfig(dmi_root=str(tmp_path))  # no provider label, no cloud in the DMI strings
        assert fetch_attestation(off, {}, environ={"ELASTICTRAIN_METADATA_ENDPOINT": aws.url}) is None
        assert fetch_attestation(et.NoticeConfig(cloud="off"), {"provider": "aws"},
                                 environ={"ELASTICTRAIN_METADATA_ENDPOINT": aws.url}) is None
        assert aws.count("/latest/dynamic/instance-identity/document") == 1
        aws.serve_garbage()  # garbage is only for notices; a failing server gives no attestation
        aws.fail_with(500)
        assert fetch_attestation(notices, {"provider": "aws"}, environ={"ELASTICTRAIN_METADATA_ENDPOINT": aws.url}) \
            is None
