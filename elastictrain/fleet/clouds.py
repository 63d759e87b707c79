"""Which cloud this node runs on, from local facts only: a setting, the node's labels, its DMI strings.

The answer decides whether a preemption-notice watcher polls a metadata service at all. It is never
found by asking the metadata address (169.254.169.254): off a cloud such a probe would send packets
to an address that may belong to someone else, and waits for a timeout on every start. Unknown is
an answer too (None): then nothing polls. Pure: no Ray, no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

PROVIDERS = ("aws", "gcp", "azure")
"""The clouds whose preemption notices elastictrain reads."""

DEFAULT_DMI_ROOT = "/sys/class/dmi/id"
DMI_FILES = ("sys_vendor", "product_name", "bios_vendor", "chassis_asset_tag")
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
"""The chassis asset tag every Azure VM carries (Hyper-V elsewhere says Microsoft Corporation too)."""
MAX_DMI_BYTES = 256

PROVIDER_LABELS = ("provider", "cloud", "cloud-provider", "cloud_provider", "elastictrain/provider")
"""Node labels that may name the node's cloud, in the order they are read."""

ALIASES: Mapping[str, str] = {
    "aws": "aws", "amazon": "aws", "ec2": "aws", "amazon-web-services": "aws", "amazonwebservices": "aws",
    "gcp": "gcp", "gce": "gcp", "google": "gcp", "google-cloud": "gcp", "googlecloud": "gcp", "gke": "gcp",
    "azure": "azure", "microsoft": "azure", "microsoft-azure": "azure", "az": "azure", "aks": "azure",
}
"""Label values (lower case) that name a provider, and the provider they name."""

MANAGED_LABEL_PREFIXES = (
    ("eks.amazonaws.com/", "aws"),
    ("cloud.google.com/gke-", "gcp"),
    ("kubernetes.azure.com/", "azure"),
)
"""Label keys that managed Kubernetes services put on their nodes (KubeRay copies node labels)."""


@dataclass(frozen=True)
class Cloud:
    """The cloud a node runs on and the fact that said so (for the log line)."""

    provider: str
    """One of `PROVIDERS`."""
    source: str
    """"setting", "label:<key>" or "dmi:<file>"."""


def normalise_provider(value: object) -> Optional[str]:
    """The provider a label value or setting names ('Amazon', 'GCE', 'azure', ...), or None."""
    if not isinstance(value, str):
        return None
    return ALIASES.get(value.strip().lower().replace(" ", "-").replace("_", "-"))


def from_labels(labels: Optional[Mapping[str, object]]) -> Optional[Cloud]:
    """The cloud a node's Ray labels name, or None (no such label, or a provider not in `PROVIDERS`)."""
    labels = labels or {}
    for key in PROVIDER_LABELS:
        provider = normalise_provider(labels.get(key))
        if provider is not None:
            return Cloud(provider, f"label:{key}")
    for key in labels:
        for prefix, provider in MANAGED_LABEL_PREFIXES:
            if isinstance(key, str) and key.startswith(prefix):
                return Cloud(provider, f"label:{key}")
    return None


def read_dmi(root: Union[str, Path] = DEFAULT_DMI_ROOT) -> dict[str, str]:
    """The DMI strings `DMI_FILES` under `root` that can be read (missing or unreadable ones are left out)."""
    out = {}
    for name in DMI_FILES:
        try:
            with open(Path(root) / name, "rb") as f:
                out[name] = f.read(MAX_DMI_BYTES).decode("utf-8", "replace").strip()
        except OSError:
            continue
    return out


def from_dmi(dmi: Mapping[str, str]) -> Optional[Cloud]:
    """The cloud that DMI strings name: Amazon EC2, Google Compute Engine, or Azure (Microsoft
    Corporation and Azure's chassis asset tag); None for anything else (a laptop, on-premises Hyper-V)."""
    vendor = dmi.get("sys_vendor", "").lower()
    product = dmi.get("product_name", "").lower()
    bios = dmi.get("bios_vendor", "").lower()
    if "amazon ec2" in vendor or "amazon ec2" in bios:
        return Cloud("aws", "dmi:sys_vendor" if "amazon ec2" in vendor else "dmi:bios_vendor")
    if vendor == "google" or "google compute engine" in product or bios == "google":
        return Cloud("gcp", "dmi:sys_vendor" if vendor == "google" else
                     "dmi:product_name" if "google compute engine" in product else "dmi:bios_vendor")
    if dmi.get("chassis_asset_tag", "").strip() == AZURE_ASSET_TAG and "microsoft" in vendor:
        return Cloud("azure", "dmi:chassis_asset_tag")
    return None


def detect_cloud(
    setting: str = "auto",
    labels: Optional[Mapping[str, object]] = None,
    dmi_root: Union[str, Path, None] = None,
) -> Optional[Cloud]:
    """The cloud this node runs on, from local facts in this order: `setting` ("aws", "gcp", "azure";
    "off" gives None), the node's `labels`, the DMI strings under `dmi_root`. None when none of them
    names one of `PROVIDERS`: then no watcher polls anything.

    Example:
        >>> detect_cloud("auto", {"provider": "gcp"}).provider
        'gcp'
    """
    if setting == "off":
        return None
    if setting != "auto":
        provider = normalise_provider(setting)
        if provider is None:
            raise ValueError(f"cloud={setting!r}: use 'auto', 'off', 'aws', 'gcp' or 'azure'")
        return Cloud(provider, "setting")
    return from_labels(labels) or from_dmi(read_dmi(DEFAULT_DMI_ROOT if dmi_root is None else dmi_root))
