"""The prices file of `elastictrain report`: the example parses, and a bad file names its line or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastictrain.errors import BadPrices
from elastictrain.fleet.report_prices import load_prices, parse_prices

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prices.toml"


def test_the_example_file_parses():
    prices = load_prices(str(EXAMPLE))
    assert prices.bucket_provider == "aws" and prices.bucket_region == "us-east-1"
    aws = prices.providers["aws"]
    assert aws.hourly_for("g5.xlarge") == 0.45
    assert aws.hourly_for("not-listed") == aws.default_hourly == 1.20
    assert aws.egress_per_gb == 0.09 and aws.setup_per_worker == 0.01


def test_a_provider_without_default_prices_only_listed_instances():
    prices = parse_prices('[providers.x.hourly]\n"big" = 3\n')
    assert prices.providers["x"].hourly_for("big") == 3.0
    assert prices.providers["x"].hourly_for("small") is None
    assert prices.providers["x"].hourly_for(None) is None


@pytest.mark.parametrize("text, named", [
    ("[providers.aws]\negress_per_gb = 0.1\ndefault_hourly = = 2\nsetup_per_worker = 0\n", "line 3"),  # not TOML
    ("[providers.aws]\negres_per_gb = 0.1\n", "providers.aws.egres_per_gb"),  # a typo'd key
    ("[providers.aws]\negress_per_gb = -1\n", "providers.aws.egress_per_gb"),  # negative
    ('[providers.aws]\ndefault_hourly = "cheap"\n', "providers.aws.default_hourly"),  # a string
    ('[providers.aws.hourly]\n"g5" = true\n', "providers.aws.hourly.'g5'"),  # a bool is not a price
    ('[bucket]\nprovider = "aws"\nzone = "a"\n', "bucket.zone"),
    ('providers = 3\n', "providers"),
    ('price = 3\n', "'price'"),
    ('[providers.aws]\negress_per_gb = nan\n', "providers.aws.egress_per_gb"),
])
def test_a_bad_file_names_the_line_or_key(tmp_path, text, named):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(BadPrices) as info:
        load_prices(str(path))
    assert named in str(info.value) and str(path) in str(info.value)


def test_a_missing_file_is_a_bad_prices_error(tmp_path):
    with pytest.raises(BadPrices, match="cannot read"):
        load_prices(str(tmp_path / "none.toml"))
