"""Which network a worker's collectives use, and whether a world may span networks in plaintext.

gloo and NCCL carry gradients and state unencrypted. `NetworkConfig` names the private network
(an interface such as a WireGuard or Tailscale overlay, or an address range); a world whose ranks
sit on nodes of different providers or regions over a network not declared private is refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Iterable, Mapping, Optional

from elastictrain.config import NetworkConfig

_SIOCGIFADDR = 0x8915
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def interface_addresses() -> dict[str, list[str]]:
    """Every network interface of this machine and its addresses (IPv4 by ioctl, IPv6 from /proc)."""
    out: dict[str, list[str]] = {}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    for name in names:
        out.setdefault(name, [])
        try:
            import fcntl

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            out[name].append(socket.inet_ntoa(packed[20:24]))
        except (OSError, ImportError):
            pass
    try:
        with open("/proc/net/if_inet6") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 6:
                    addr = ipaddress.IPv6Address(int(fields[0], 16))
                    out.setdefault(fields[5], []).append(str(addr))
    except OSError:
        pass
    return out


def pick_interface(network: NetworkConfig, host: str = "",
                   addresses: Optional[Mapping[str, list[str]]] = None) -> Optional[str]:
    """The interface this worker's collectives bind to: the one `network` names, the one with an
    address in its range, loopback for a single-machine run on 127.0.0.1, or None (the backends'
    own choice).

    Raises:
        RuntimeError: the named interface does not exist here, or no interface is in the range.
    """
    if network.interface is None and network.cidr is None:
        return "lo" if host in _LOOPBACK else None
    addresses = interface_addresses() if addresses is None else addresses
    if network.interface is not None:
        if network.interface not in addresses:
            raise RuntimeError(
                f"NetworkConfig(interface={network.interface!r}): no such interface on this machine (it has "
                f"{', '.join(sorted(addresses)) or 'none'}); bring the overlay up on every node first"
            )
        return network.interface
    cidr = ipaddress.ip_network(network.cidr, strict=False)
    for name, addrs in sorted(addresses.items()):
        for addr in addrs:
            try:
                if ipaddress.ip_address(addr.split("%", 1)[0]) in cidr:
                    return name
            except ValueError:
                continue
    raise RuntimeError(
        f"NetworkConfig(cidr={network.cidr!r}): no interface of this machine has an address in that range; "
        "join the node to the private network first"
    )


def apply_network(network: NetworkConfig, host: str = "", environ=None) -> Optional[str]:
    """Point gloo (`GLOO_SOCKET_IFNAME`) and NCCL (`NCCL_SOCKET_IFNAME`) at the chosen interface,
    before any group forms; returns it. A named interface or range overrides what the environment
    said; loopback only fills an unset variable."""
    environ = os.environ if environ is None else environ
    name = pick_interface(network, host)
    if name is None:
        return None
    if network.interface is None and network.cidr is None:
        environ.setdefault("GLOO_SOCKET_IFNAME", name)
    else:
        environ["GLOO_SOCKET_IFNAME"] = name
        environ["NCCL_SOCKET_IFNAME"] = name
    return name


def spanned_networks(labels: Iterable[Mapping[str, str]], span_labels: Iterable[str]) -> dict[str, list[str]]:
    """For each of `span_labels` that takes more than one value among the ranks' node labels, the
    values (sorted); empty when every rank shares every one (or carries none)."""
    rows = [dict(x) for x in labels]
    out: dict[str, list[str]] = {}
    for label in span_labels:
        values = sorted({str(row[label]) for row in rows if label in row})
        if len(values) > 1:
            out[label] = values
    return out


def plaintext_refusal(labels: Iterable[Mapping[str, str]], network: NetworkConfig) -> Optional[str]:
    """Why a world with these ranks' node labels must not form over `network`, or None when it may."""
    if network.is_private or network.allow_plaintext:
        return None
    spans = spanned_networks(labels, network.span_labels)
    if not spans:
        return None
    where = "; ".join(f"{label}: {', '.join(values)}" for label, values in spans.items())
    return (
        f"the world spans networks ({where}) and collectives (gradients, model and optimizer state) are "
        "plaintext on gloo and NCCL: run the nodes on a private or encrypted network and name it, "
        "NetworkConfig(interface='wg0') or NetworkConfig(cidr='100.64.0.0/10') (a WireGuard or Tailscale "
        "overlay, a VPC peering), or declare it NetworkConfig(private=True); or accept plaintext across "
        "networks with NetworkConfig(allow_plaintext=True)"
    )
