"""NetworkConfig: which interface collectives bind to, and when a world may span networks in plaintext."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import elastictrain as et
from elastictrain.runtime.network import apply_network, pick_interface, plaintext_refusal, spanned_networks

ADDRS = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.3.7"], "wg0": ["100.72.1.9"]}
AWS = {"provider": "aws", "region": "us-east-1"}
AWS_WEST = {"provider": "aws", "region": "us-west-2"}
GCP = {"provider": "gcp", "region": "europe-west4"}


def test_the_named_interface_or_the_one_in_the_range_is_used():
    assert pick_interface(et.NetworkConfig(interface="wg0"), addresses=ADDRS) == "wg0"
    assert pick_interface(et.NetworkConfig(cidr="100.64.0.0/10"), addresses=ADDRS) == "wg0"
    assert pick_interface(et.NetworkConfig(), "127.0.0.1", addresses=ADDRS) == "lo"
    assert pick_interface(et.NetworkConfig(), "10.0.3.7", addresses=ADDRS) is None  # the backends choose


def test_a_missing_interface_or_range_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"no such interface on this machine \(it has eth0, lo, wg0\)"):
        pick_interface(et.NetworkConfig(interface="tailscale0"), addresses=ADDRS)
    with pytest.raises(RuntimeError, match="no interface of this machine has an address in that range"):
        pick_interface(et.NetworkConfig(cidr="192.168.0.0/16"), addresses=ADDRS)


def test_apply_sets_both_backends_and_overrides_the_environment():
    env = {"GLOO_SOCKET_IFNAME": "eth0"}
    assert apply_network(et.NetworkConfig(interface="lo"), environ=env) == "lo"
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env = {"GLOO_SOCKET_IFNAME": "eth0"}
    apply_network(et.NetworkConfig(), "127.0.0.1", environ=env)  # loopback only fills an unset variable
    assert env == {"GLOO_SOCKET_IFNAME": "eth0"}


def test_config_validation_names_the_fix_and_hides_secrets():
    with pytest.raises(ValidationError, match="not both"):
        et.NetworkConfig(interface="wg0", cidr="10.0.0.0/8")
    with pytest.raises(ValidationError, match="not an address range"):
        et.NetworkConfig(cidr="10.0.0.0/33")
    with pytest.raises(ValidationError, match="not a network interface name"):
        et.NetworkConfig(interface="eth0; rm -rf /")
    pasted = "q2sZb0dI0Uj3q4yJbbqR8wD8o1kS7lq0lIYbq9sFf0E="
    with pytest.raises(ValidationError) as err:
        et.NetworkConfig(secret=pasted)
    assert pasted not in str(err.value) and "not shown" in str(err.value)
    assert et.NetworkConfig(interface="wg0").is_private and et.NetworkConfig(cidr="10.0.0.0/8").is_private
    assert not et.NetworkConfig(interface="wg0", private=False).is_private
    assert not et.NetworkConfig().is_private


def test_a_world_across_providers_or_regions_is_refused_without_a_private_network():
    assert spanned_networks([AWS, AWS], ["provider", "region"]) == {}
    assert spanned_networks([AWS, AWS_WEST], ["provider", "region"]) == {"region": ["us-east-1", "us-west-2"]}
    assert plaintext_refusal([AWS, AWS], et.NetworkConfig()) is None
    assert plaintext_refusal([{}, {}], et.NetworkConfig()) is None  # unlabelled nodes: one network as far as is known
    message = plaintext_refusal([AWS, GCP], et.NetworkConfig())
    assert message is not None and "provider: aws, gcp" in message and "allow_plaintext=True" in message
    assert plaintext_refusal([AWS, AWS_WEST], et.NetworkConfig()) is not None
    for allowed in (et.NetworkConfig(interface="wg0"), et.NetworkConfig(private=True),
                    et.NetworkConfig(allow_plaintext=True), et.NetworkConfig(span_labels=["provider"])):
        assert plaintext_refusal([AWS, AWS_WEST], allowed) is None
