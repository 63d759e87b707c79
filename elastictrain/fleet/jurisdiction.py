"""The jurisdiction policy: the regions where workers may run and where the checkpoint bucket may be.

A region is the value of a node's `region` label (`REGION_LABEL`). Workers are kept inside by a Ray
label selector (`region_selector`, composed into the actor options), and a world with a member outside is
refused at its start anyway (`world_refusal`: defence in depth, say a node relabelled or a selector
another option replaced). The bucket's region is `CheckpointConfig.bucket_region`, else, for S3, the
bucket's location as S3 reports it; a bucket outside, or one whose region cannot be told, is refused at
`fit()` start, before any worker starts (`check_bucket`). The checks are pure but `bucket_location`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

from elastictrain.errors import OutsideJurisdiction

REGION_LABEL = "region"
_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
"""A Ray label value (what `in(...)` may list)."""


def check_regions(regions: Optional[Sequence[str]], what: str) -> Optional[list[str]]:
    """`regions` as a policy (None: no policy), or ValueError saying what to change."""
    if regions is None:
        return None
    regions = list(regions)
    if not regions:
        raise ValueError(f"{what}=[] allows no region at all: list at least one region label value, or leave "
                         "it unset for no policy")
    for region in regions:
        if not isinstance(region, str) or not _VALUE.fullmatch(region):
            raise ValueError(f"{what} holds {str(region)[:80]!r}, not a node label value (letters, digits, '-', "
                             "'_', '.'; at most 63 characters), e.g. 'eu-west-1'")
    return sorted(set(regions))


def _named(value: str) -> Optional[list[str]]:
    """The region values a selector value names positively ('a' or 'in(a,b)'); None for a negation."""
    value = value.strip()
    if value.startswith("!"):
        return None
    m = re.fullmatch(r"in\((.*)\)", value)
    return [v.strip() for v in m.group(1).split(",")] if m else [value]


def region_selector(allowed: Optional[Sequence[str]], label_selector: Optional[Mapping[str, str]] = None) -> dict:
    """The Ray label selector entry that keeps workers in `allowed` regions: {"region": "in(a,b)"}; empty
    without a policy. A selector that already names the region (the user's, or another placement's such
    as a spread over regions) is narrowed to the allowed regions it names (all of them if it names none)."""
    if not allowed:
        return {}
    regions = sorted(allowed)
    if label_selector and REGION_LABEL in label_selector:
        named = _named(str(label_selector[REGION_LABEL]))
        inside = sorted(set(named or ()) & set(allowed))
        if inside and named is not None and set(named) <= set(allowed):
            return {}  # already inside: left as it is
        regions = inside or regions
    return {REGION_LABEL: f"in({','.join(regions)})"}


def selector_refusal(allowed: Optional[Sequence[str]], label_selector: Optional[Mapping[str, str]]) -> Optional[str]:
    """Why a `label_selector` naming the region contradicts the policy, or None."""
    if not allowed or not label_selector or REGION_LABEL not in label_selector:
        return None
    value = str(label_selector[REGION_LABEL]).strip()
    named = _named(value)
    if named is None or any(v not in allowed for v in named):
        return (f"label_selector region={value!r} reaches outside allowed_regions {sorted(allowed)}: drop the "
                "region from label_selector (allowed_regions adds its own), or name only allowed regions")
    return None


def world_refusal(members: Sequence[str], labels: Sequence[Mapping[str, object]],
                  allowed: Optional[Sequence[str]]) -> Optional[str]:
    """Why a world whose rank r is `members[r]` on a node labelled `labels[r]` breaks the policy, or None."""
    if not allowed:
        return None
    outside = []
    for rank, member in enumerate(members):
        region = (labels[rank] if rank < len(labels) else {}).get(REGION_LABEL)
        if region is None or str(region) not in allowed:
            outside.append(f"{member} (region {'unlabelled' if region is None else repr(str(region))})")
    if not outside:
        return None
    return (f"jurisdiction: {len(outside)} member(s) of the world run outside allowed_regions {sorted(allowed)}: "
            f"{', '.join(outside[:5])}{', ...' if len(outside) > 5 else ''}; label those nodes' region, or "
            "widen ScalingConfig.allowed_regions")


def bucket_location(uri: str, storage_options: Optional[dict] = None,
                    environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The region an S3 bucket is in, as S3 reports it (GetBucketLocation; empty means us-east-1); None
    for other storage. Raises what boto raises (no access, no such bucket)."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    import boto3

    from elastictrain.checkpoint.credentials import resolve_options

    options = resolve_options(storage_options or {}, environ)
    client_kwargs = dict(options.get("client_kwargs") or {})
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    client = boto3.client(
        "s3", endpoint_url=client_kwargs.get("endpoint_url") or options.get("endpoint_url"),
        aws_access_key_id=options.get("key"), aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"), region_name=client_kwargs.get("region_name"),
    )
    return client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"


def check_bucket(config, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The checkpoint bucket's region when `config.allowed_regions` allows it (None: no policy or no URI).

    Raises:
        OutsideJurisdiction: the bucket is in another region, or its region cannot be told.
    """
    allowed = config.allowed_regions
    if not allowed or config.uri is None:
        return None
    region, source = config.bucket_region, "CheckpointConfig.bucket_region"
    if region is None:
        try:
            region, source = bucket_location(config.uri, config.storage_options, environ), "the bucket's location"
        except Exception as exc:  # noqa: BLE001 - refused below, with the reason
            raise OutsideJurisdiction(
                f"jurisdiction: cannot tell the region of {config.uri} ({type(exc).__name__}: {str(exc)[:200]}); "
                "set CheckpointConfig.bucket_region, or give access to GetBucketLocation") from None
    if region is None:
        raise OutsideJurisdiction(
            f"jurisdiction: the region of {config.uri} is unknown (not an S3 bucket): set "
            f"CheckpointConfig.bucket_region to where it lies, one of {sorted(allowed)}")
    if region not in allowed:
        raise OutsideJurisdiction(
            f"jurisdiction: checkpoint storage {config.uri} is in {region!r} ({source}), outside "
            f"CheckpointConfig.allowed_regions {sorted(allowed)}: use a bucket in an allowed region, or widen the "
            "policy")
    return region


def boundary_of(upload: Mapping[str, object], bucket: Mapping[str, object]) -> Optional[str]:
    """'provider:A->B', 'region:A->B' names of the boundaries an upload from `upload` to `bucket` crosses
    ({"provider", "region"} each); None when it crosses none (or a side is unknown)."""
    crossed = []
    for key in ("provider", "region"):
        a, b = upload.get(key), bucket.get(key)
        if a and b and a != b:
            crossed.append(f"{key}:{a}->{b}")
    return ", ".join(crossed) or None
