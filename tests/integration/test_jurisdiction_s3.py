"""The checkpoint bucket's region, read from S3 itself (a moto server on 127.0.0.1), against the policy."""

from __future__ import annotations

import boto3
import pytest

import elastictrain as et
from elastictrain.errors import OutsideJurisdiction
from elastictrain.fleet.jurisdiction import bucket_location, check_bucket

pytest.importorskip("moto.server")


def _bucket(endpoint: str, name: str, region: str) -> dict:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, **extra)
    return {"client_kwargs": {"endpoint_url": endpoint}}


def test_a_bucket_in_another_region_is_refused_at_fit_start_and_one_inside_passes(s3_server):
    import ray

    eu = _bucket(s3_server, "eu-bucket", "eu-west-1")
    us = _bucket(s3_server, "us-bucket", "us-east-1")
    assert bucket_location("s3://eu-bucket/run", eu) == "eu-west-1"
    assert bucket_location("s3://us-bucket/run", us) == "us-east-1"  # S3 answers no constraint there
    policy = ["eu-west-1", "eu-central-1"]
    assert check_bucket(et.CheckpointConfig(uri="s3://eu-bucket/run", storage_options=eu,
                                            allowed_regions=policy)) == "eu-west-1"
    outside = et.CheckpointConfig(uri="s3://us-bucket/run", storage_options=us, allowed_regions=policy)
    with pytest.raises(OutsideJurisdiction, match=r"s3://us-bucket/run is in 'us-east-1' \(the bucket's location\)"):
        et.ElasticTrainer(lambda ctx: None, checkpoint=outside).fit()
    assert not ray.is_initialized()  # refused before any worker (or Ray) started
    with pytest.raises(OutsideJurisdiction, match="cannot tell the region.*NoSuchBucket"):
        check_bucket(et.CheckpointConfig(uri="s3://missing/run", storage_options=us, allowed_regions=policy))
