"""Prices for `elastictrain report`: a small TOML file, read with `tomllib` and checked key by key.

The format (see `examples/prices.toml` and docs/reports.md):

    currency = "USD"                 # a label only
    [bucket]                         # where the checkpoints are stored
    provider = "aws"
    region = "us-east-1"
    [providers.aws]
    egress_per_gb = 0.09             # bytes leaving this provider (to another provider's bucket)
    inter_region_per_gb = 0.02       # bytes to another region of this provider
    setup_per_worker = 0.0           # dollars each worker started costs once (boot, image pull)
    default_hourly = 1.2             # per worker-hour, for instance types not listed below
    [providers.aws.hourly]           # per worker-hour, by the node's `instance_type` label
    "g5.xlarge" = 1.006

Pure: no Ray, no fsspec.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from elastictrain.errors import BadPrices

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

_PROVIDER_NUMBERS = ("egress_per_gb", "inter_region_per_gb", "setup_per_worker", "default_hourly")


@dataclass(frozen=True)
class ProviderPrices:
    """One provider's prices, in dollars (or `Prices.currency`)."""

    hourly: dict[str, float] = field(default_factory=dict)
    default_hourly: Optional[float] = None
    egress_per_gb: float = 0.0
    inter_region_per_gb: float = 0.0
    setup_per_worker: float = 0.0

    def hourly_for(self, instance_type: Optional[str]) -> Optional[float]:
        """The price of a worker-hour on `instance_type`, or None when neither it nor a default is priced."""
        if instance_type is not None and instance_type in self.hourly:
            return self.hourly[instance_type]
        return self.default_hourly


@dataclass(frozen=True)
class Prices:
    """A parsed prices file."""

    providers: dict[str, ProviderPrices]
    currency: str = "USD"
    bucket_provider: Optional[str] = None
    bucket_region: Optional[str] = None


def _number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise BadPrices(f"{where} = {value!r}: give a number of 0 or more")
    return float(value)


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadPrices(f"{where} must be a table ([{where}]), not a {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadPrices(f"{where} = {value!r}: give a non-empty string")
    return value


def parse_prices(text: str, source: str = "prices") -> Prices:
    """Parse the text of a prices file.

    Raises:
        BadPrices: it is not TOML (the message has the line and column), or a key is unknown, or a
            value is of the wrong type or negative (the message names the key).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadPrices(f"{source}: not TOML: {exc}") from None
    try:
        return _prices(doc)
    except BadPrices as exc:
        raise BadPrices(f"{source}: {exc}") from None


def _prices(doc: dict) -> Prices:
    unknown = sorted(set(doc) - {"currency", "bucket", "providers"})
    if unknown:
        raise BadPrices(f"unknown key {unknown[0]!r}; known: currency, bucket, providers")
    currency = _string(doc.get("currency", "USD"), "currency")
    bucket = _table(doc.get("bucket", {}), "bucket")
    unknown = sorted(set(bucket) - {"provider", "region"})
    if unknown:
        raise BadPrices(f"unknown key 'bucket.{unknown[0]}'; known: provider, region")
    providers = {}
    for name, table in _table(doc.get("providers", {}), "providers").items():
        where = f"providers.{name}"
        table = _table(table, where)
        unknown = sorted(set(table) - {"hourly", *_PROVIDER_NUMBERS})
        if unknown:
            raise BadPrices(f"unknown key '{where}.{unknown[0]}'; known: hourly, {', '.join(_PROVIDER_NUMBERS)}")
        hourly = {str(k): _number(v, f"{where}.hourly.{k!r}")
                  for k, v in _table(table.get("hourly", {}), f"{where}.hourly").items()}
        numbers = {k: _number(table[k], f"{where}.{k}") for k in _PROVIDER_NUMBERS if k in table}
        providers[name] = ProviderPrices(hourly=hourly, **numbers)
    return Prices(
        providers=providers, currency=currency,
        bucket_provider=_string(bucket["provider"], "bucket.provider") if "provider" in bucket else None,
        bucket_region=_string(bucket["region"], "bucket.region") if "region" in bucket else None,
    )


def load_prices(path: str) -> Prices:
    """Read and parse a prices file (see `parse_prices`).

    Raises:
        BadPrices: as `parse_prices`, or the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadPrices(f"{path}: cannot read: {type(exc).__name__}: {exc}") from None
    return parse_prices(text, path)
