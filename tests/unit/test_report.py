"""`fleet.report.compute` on a hand-built event log whose every number is worked out by hand below."""

from __future__ import annotations

import json

import pytest

from elastictrain.events import event
from elastictrain.fleet.report import compute
from elastictrain.fleet.report_files import PLOTS, write
from elastictrain.fleet.report_prices import parse_prices

PRICES = """
[bucket]
provider = "aws"
region = "us-east-1"
[providers.aws]
egress_per_gb = 0.1
inter_region_per_gb = 0.02
setup_per_worker = 0.05
default_hourly = 1.0
[providers.aws.hourly]
"g5.xlarge" = 0.5
[providers.gcp]
egress_per_gb = 0.12
[providers.gcp.hourly]
"a2-highgpu-1g" = 2.0
"""


def joined(member, term, t, leader, provider, region, instance, gpus=1.0):
    return event("joined", member=member, term=term, rank=0, world_size=1, leader=leader, time=t,
                 provider=provider, region=region, instance_type=instance, gpus=gpus)


def two_runs() -> list[dict]:
    """Run 0: three workers (two AWS regions, one GCP), a follower killed, the rebuilt world redoes steps 8-9, then
    an unplanned loss ends it. Run 1 (resubmitted): one AWS worker in another region resumes at 18, then is killed."""
    return [
        event("log_opened", run="r", time=1000.0),
        *(event("worker_started", member=m, time=1000.0) for m in "abc"),
        joined("a", 1, 1010.0, True, "aws", "us-east-1", "g5.xlarge"),
        joined("b", 1, 1010.0, False, "gcp", "europe-west4", "a2-highgpu-1g"),
        joined("c", 1, 1010.0, False, "aws", "us-west-2", "p4d.24xlarge"),
        event("steps", term=1, first=0, last=9, first_time=1011.0, time=1020.0),
        event("checkpoint", term=1, step=9, bytes_written=2_000_000_000, time=1020.5),
        event("fault_injected", member="c", fault="kill_follower", index=0, time=1021.0),
        event("worker_lost", member="c", reason="ActorDiedError", time=1021.5),
        joined("a", 2, 1022.0, False, "aws", "us-east-1", "g5.xlarge"),
        joined("b", 2, 1022.0, True, "gcp", "europe-west4", "a2-highgpu-1g"),
        event("steps", term=2, first=8, last=13, first_time=1023.0, time=1028.0),
        event("steps", term=2, first=14, last=19, first_time=1029.0, time=1034.0),
        event("checkpoint", term=2, step=19, bytes_written=1_000_000_000, time=1035.0),
        event("worker_lost", member="b", reason="ActorDiedError", time=1040.0),
        event("log_opened", run="r", time=2000.0),
        event("worker_started", member="d", time=2000.0),
        joined("d", 1, 2005.0, True, "aws", "us-west-2", "g5.xlarge", gpus=2.0),
        event("steps", term=1, first=18, last=21, first_time=2006.0, time=2009.0),
        event("checkpoint", term=1, step=21, bytes_written=500_000_000, time=2009.2),
        event("fault_injected", member="d", fault="kill_leader", index=0, time=2009.5),
        event("worker_lost", member="d", reason="ActorDiedError", time=2010.0),
    ]


def test_every_number_of_a_hand_built_log():
    report = compute(two_runs(), [], parse_prices(PRICES))
    assert report["runs"] == 2
    assert report["steps_committed"] == 10 + 12 + 4
    assert report["distinct_steps"] == 22  # steps 0..21
    assert report["steps_redone"] == 4  # 8, 9 (term 2) and 18, 19 (the resubmitted run)
    assert report["goodput"] == pytest.approx(22 / 26)
    # faults: c (index 0, its loss is the same fault), b's unplanned loss, d (run 1's index 0)
    assert report["faults"] == 3
    rows = report["fault_list"]
    assert [(f["fault"], f["members"], f["term"], f["resumed"]) for f in rows] == [
        ("kill_follower", ["c"], 1, True), ("lost", ["b"], 2, True), ("kill_leader", ["d"], 1, False)]
    assert rows[0]["recovery_s"] == pytest.approx(1023.0 - 1021.0)
    assert rows[1]["recovery_s"] == pytest.approx(2006.0 - 1040.0)  # the resubmitted run's first commit
    assert report["resume_rate"] == pytest.approx(2 / 3)
    assert report["recovery_s_median"] == pytest.approx((2.0 + 966.0) / 2)
    # held: a 1000-1040 (run end), b 1000-1040 (lost), c 1000-1021.5, d 2000-2010 with 2 GPUs
    assert report["gpu_hours"] == pytest.approx({"aws": (40 + 21.5 + 2 * 10) / 3600, "gcp": 40 / 3600})
    assert report["setup_hours"] == pytest.approx((10 + 10 + 10 + 5) / 3600)
    # worlds: (0,1) 3 GPUs x 10 s x 8/10 kept; (0,2) 2 x 12 s x 10/12; (1,1) 2 x 4 s x 4/4
    assert report["effective_gpu_hours"] == pytest.approx((3 * 10 * 0.8 + 2 * 12 * 10 / 12 + 2 * 4) / 3600)
    aws = 10 * 2 / 3 + 12 / 2 + 4
    assert report["steps_by_provider"] == pytest.approx({"aws": aws, "gcp": 10 / 3 + 12 / 2})
    assert report["steps_by_region"] == pytest.approx(
        {"us-east-1": 10 / 3 + 6, "europe-west4": 10 / 3 + 6, "us-west-2": 10 / 3 + 4})
    assert report["largest_provider_share"] == pytest.approx(aws / 26)
    # term 1's leader a is in the bucket's region; term 2's leader b is on GCP; run 1's d in another AWS region
    assert report["bytes_across_boundaries"] == 1_000_000_000 + 500_000_000
    hours = {"aws/g5.xlarge": (40 + 10) / 3600 * 0.5, "aws/p4d.24xlarge": 21.5 / 3600 * 1.0,
             "gcp/a2-highgpu-1g": 40 / 3600 * 2.0}
    assert report["cost_by_provider_instance"] == pytest.approx(hours)
    assert report["setup_cost"] == pytest.approx(3 * 0.05)
    assert report["egress_cost"] == pytest.approx(1.0 * 0.12 + 0.5 * 0.02)
    total = sum(hours.values()) + 0.15 + 0.13
    assert report["cost_total"] == pytest.approx(total)
    assert report["cost_per_effective_gpu_hour"] == pytest.approx(total / ((24 + 20 + 8) / 3600))
    assert report["world_sizes"] == [[10.0, 3, 0, 1], [22.0, 2, 0, 2], [1005.0, 1, 1, 1]]


def test_without_prices_or_bucket_there_are_no_dollars_and_a_note():
    report = compute(two_runs(), [])
    assert report["cost_total"] is None and report["cost_per_effective_gpu_hour"] is None
    assert report["bytes_across_boundaries"] == 0
    assert any("bucket" in note for note in report["notes"])


def test_an_empty_log_gives_none_not_a_division_by_zero():
    report = compute([], [])
    assert report["goodput"] is None and report["resume_rate"] is None and report["steps_committed"] == 0


def test_write_makes_json_markdown_and_pngs(tmp_path):
    report = compute(two_runs(), [{"step": 9, "provenance": {"provider": "aws"}}], parse_prices(PRICES))
    write(report, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text())["steps_redone"] == 4
    assert "| resume_rate | 0.6667 |" in (tmp_path / "report.md").read_text()
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
