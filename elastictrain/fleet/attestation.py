"""The node's attestation: the signed instance identity its cloud gives (AWS identity document and its
signatures, GCP identity token, Azure attested data), fetched once when a worker starts and stored in
the manifests it saves (`elastictrain.checkpoint.provenance`).

The cloud comes from the notice machinery's detection (setting, node labels, DMI strings: never a probe
of the metadata address) and its endpoint override; on a node of no known cloud nothing is asked.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Mapping, Optional

from elastictrain.checkpoint.provenance import attestation_digest, check_attestation
from elastictrain.config import NoticeConfig
from elastictrain.fleet.clouds import detect_cloud
from elastictrain.fleet.notice_watch import notice_endpoint
from elastictrain.fleet.notices import make_watcher

log = logging.getLogger("elastictrain.fleet")


def key_id_of(identity: Mapping[str, str]) -> str:
    """What names the key that signed `identity`, never a key: a GCP token's `kid` header; for AWS, the
    region whose published certificate verifies the document; for Azure, its PKCS#7 encoding ('' if
    unknown)."""
    provider = identity.get("provider")
    try:
        if provider == "gcp":
            header = identity["token"].split(".", 1)[0]
            decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
            return str(decoded.get("kid", ""))[:128] if isinstance(decoded, dict) else ""
        if provider == "aws":
            region = json.loads(identity["document"]).get("region", "")
            return f"aws-instance-identity:{region}"[:128] if region else ""
        if provider == "azure":
            return f"azure-attested:{identity.get('encoding', '')}"[:128]
    except (KeyError, ValueError, TypeError, AttributeError):
        return ""
    return ""


def attestation_record(identity: Mapping[str, str]) -> dict[str, str]:
    """The manifest's attestation of an identity `fetch_identity()` returned: its fields, the key id and
    the digest members carry (checked as a manifest reader will check it)."""
    doc = {str(k): str(v) for k, v in identity.items()}
    return check_attestation({**doc, "key_id": key_id_of(doc), "digest": attestation_digest(doc)})


def fetch_attestation(config: NoticeConfig, labels: Optional[Mapping[str, object]],
                      environ: Mapping[str, str] = os.environ) -> Optional[dict[str, str]]:
    """This node's attestation record, or None (no known cloud, no identity, or an answer that fails the
    checks: logged once, never raised)."""
    try:
        cloud = detect_cloud(config.cloud, labels, config.dmi_root)
        if cloud is None:
            return None
        watcher = make_watcher(cloud.provider, notice_endpoint(config, cloud.provider, environ),
                               timeout_s=config.timeout_s)
        identity = watcher.fetch_identity()
        return attestation_record(identity) if identity else None
    except Exception as exc:  # noqa: BLE001 - an attestation is optional: the run goes on without it
        log.warning("no attestation from the cloud's metadata service: %s: %s", type(exc).__name__, exc)
        return None
