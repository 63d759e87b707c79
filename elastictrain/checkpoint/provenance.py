"""What a manifest says about who produced its steps: the lineage since the previous checkpoint and the
saving node's attestation from its cloud. Plain, size-capped data, checked on every read. Pure.

Lineage (`Body.lineage`, empty in manifests written before it existed)::

    {"from_step": P, "to_step": N,          # the steps [P, N) this checkpoint adds to the previous one
     "complete": bool,                      # every step of [P, N) has a known producer and nothing was dropped
     "gaps": [[a, b], ...],                 # step ranges whose producer the saving leader does not know
     "dropped_terms": int,                  # oldest terms left out by MAX_TERMS (their steps are in gaps)
     "terms": [{"term": t, "steps": [a, b], "world_size": W, "global_batch": G, "dropped_members": int,
                "members": [{"rank": r, "member": id, "node": ..., "host": ..., "provider": ..., "region": ...,
                             "zone": ..., "instance_type": ..., "accelerator": ..., "attestation": "sha256:...",
                             "positions": {"start": s, "stop": e, "stride": G, "count": k}}]}]}

`positions` are the data lineage, compactly: the member consumed the positions
[start + i*stride, stop + i*stride) of the seeded epoch order for i in range(count) (step s consumes
[s*G, (s+1)*G), split over the ranks by the batch plan).

Attestation (`Body.attestation`): the saving node's signed instance identity from its cloud, as the
metadata service gave it (AWS document and signatures, GCP identity token, Azure attested data), with
the provider, the key id its signature names (never a key) and a digest; members carry the digest only.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterator

from elastictrain.errors import CheckpointCorrupt

MAX_TERMS = 32
MAX_MEMBERS = 128
MAX_TEXT = 256
MAX_DOCUMENT = 16 * 1024
MAX_ATTESTATION_FIELDS = 8
MAX_LINEAGE_BYTES = 2 * 1024 * 1024
MEMBER_FACTS = ("member", "node", "host", "provider", "region", "zone", "instance_type", "accelerator", "attestation")
"""The string facts of a lineage member (besides its rank and positions)."""
_PRINTABLE = re.compile(r"[\x20-\x7e\r\n]*")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64})?")
_ATTESTATION_META = ("provider", "key_id", "digest")


def _int(value: object) -> bool:
    return type(value) is int and 0 <= value <= 10**20


def _text(value: object, cap: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= cap and bool(_PRINTABLE.fullmatch(value))


def _range(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_int(v) for v in value) and value[0] <= value[1]


def attestation_digest(document: dict[str, str]) -> str:
    """'sha256:<hex>' of a document's canonical JSON: what members carry of their attestation."""
    raw = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def check_attestation(doc: object) -> dict[str, str]:
    """`doc` as a manifest's attestation, or CheckpointCorrupt saying what is wrong (empty: none)."""
    if not isinstance(doc, dict):
        raise CheckpointCorrupt("manifest attestation is not an object")
    if not doc:
        return {}
    if len(doc) > MAX_ATTESTATION_FIELDS + len(_ATTESTATION_META):
        raise CheckpointCorrupt(f"manifest attestation has {len(doc)} fields (at most "
                                f"{MAX_ATTESTATION_FIELDS + len(_ATTESTATION_META)})")
    for key, value in doc.items():
        if not (isinstance(key, str) and re.fullmatch(r"[a-z0-9_]{1,32}", key)):
            raise CheckpointCorrupt(f"manifest attestation field {str(key)[:40]!r} is not a short lowercase name")
        if not _text(value, MAX_DOCUMENT):
            raise CheckpointCorrupt(f"manifest attestation field {key!r} is not printable text of at most "
                                    f"{MAX_DOCUMENT} characters")
    if not all(_text(doc.get(k), MAX_TEXT) for k in _ATTESTATION_META):
        raise CheckpointCorrupt("manifest attestation lacks its provider, key id or digest")
    document = {k: v for k, v in doc.items() if k not in _ATTESTATION_META}
    if doc["digest"] != attestation_digest({**document, "provider": doc["provider"]}):
        raise CheckpointCorrupt("manifest attestation digest does not match its document")
    return dict(doc)


def _check_member(m: object, world_size: int) -> dict:
    if not (isinstance(m, dict) and set(m) == {*MEMBER_FACTS, "rank", "positions"}):
        raise CheckpointCorrupt("manifest lineage member is malformed")
    if not all(_text(m[k]) for k in MEMBER_FACTS) or not _DIGEST.fullmatch(m["attestation"]):
        raise CheckpointCorrupt("manifest lineage member has a fact that is not short printable text")
    if not (_int(m["rank"]) and m["rank"] < world_size):
        raise CheckpointCorrupt("manifest lineage member rank is outside its world")
    p = m["positions"]
    if not (isinstance(p, dict) and set(p) == {"start", "stop", "stride", "count"} and all(_int(v) for v in p.values())
            and p["start"] <= p["stop"]):
        raise CheckpointCorrupt("manifest lineage member positions are malformed")
    return m


def check_lineage(doc: object) -> dict:
    """`doc` as a manifest's lineage, or CheckpointCorrupt saying what is wrong (empty: none recorded)."""
    if not isinstance(doc, dict):
        raise CheckpointCorrupt("manifest lineage is not an object")
    if not doc:
        return {}
    try:
        size = len(json.dumps(doc, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError):
        raise CheckpointCorrupt("manifest lineage holds values JSON cannot write") from None
    if size > MAX_LINEAGE_BYTES:
        raise CheckpointCorrupt(f"manifest lineage is {size} bytes (at most {MAX_LINEAGE_BYTES})")
    if set(doc) != {"from_step", "to_step", "complete", "gaps", "dropped_terms", "terms"}:
        raise CheckpointCorrupt(f"manifest lineage fields {sorted(doc)[:10]} are not the expected ones")
    if not (_int(doc["from_step"]) and _int(doc["to_step"]) and doc["from_step"] <= doc["to_step"]
            and isinstance(doc["complete"], bool) and _int(doc["dropped_terms"])):
        raise CheckpointCorrupt("manifest lineage step range or counters are malformed")
    gaps, terms = doc["gaps"], doc["terms"]
    if not (isinstance(gaps, list) and len(gaps) <= MAX_TERMS + 1 and all(_range(g) for g in gaps)):
        raise CheckpointCorrupt("manifest lineage gaps are malformed")
    if not (isinstance(terms, list) and len(terms) <= MAX_TERMS):
        raise CheckpointCorrupt(f"manifest lineage lists more than {MAX_TERMS} terms or is malformed")
    for t in terms:
        if not (isinstance(t, dict) and set(t) == {"term", "steps", "world_size", "global_batch", "dropped_members",
                                                   "members"}):
            raise CheckpointCorrupt("manifest lineage term is malformed")
        if not (_int(t["term"]) and _range(t["steps"]) and _int(t["world_size"]) and t["world_size"] >= 1
                and _int(t["global_batch"]) and _int(t["dropped_members"])):
            raise CheckpointCorrupt("manifest lineage term has a malformed number")
        if not (isinstance(t["members"], list) and len(t["members"]) <= MAX_MEMBERS):
            raise CheckpointCorrupt(f"manifest lineage term lists more than {MAX_MEMBERS} members or is malformed")
        for m in t["members"]:
            _check_member(m, t["world_size"])
    complete = doc["complete"]
    if complete and (gaps or doc["dropped_terms"] or any(t["dropped_members"] for t in terms)):
        raise CheckpointCorrupt("manifest lineage says it is complete but lists gaps or dropped entries")
    return doc


def expand_positions(positions: dict) -> Iterator[tuple[int, int]]:
    """The [lo, hi) ranges of epoch-order positions a lineage member's `positions` stand for, merged where
    they touch (one range when the member held the whole batch)."""
    lo = hi = None
    for i in range(positions["count"]):
        a, b = positions["start"] + i * positions["stride"], positions["stop"] + i * positions["stride"]
        if a == b:
            continue
        if hi is not None and a == hi:
            hi = b
            continue
        if lo is not None:
            yield lo, hi
        lo, hi = a, b
    if lo is not None:
        yield lo, hi


def summary(lineage: dict[str, Any], provenance: dict[str, str]) -> str:
    """A short column for `ckpt ls`: the saver's provider/region, the members and terms, and '?' for gaps."""
    where = "/".join(v for v in (provenance.get("provider", ""), provenance.get("region", "")) if v) or "-"
    if not lineage:
        return where
    members = {m["member"] for t in lineage["terms"] for m in t["members"]}
    places = sorted({f"{m['provider'] or '?'}/{m['region'] or '?'}" for t in lineage["terms"] for m in t["members"]})
    text = f"{where} by {len(members)} in {len(lineage['terms'])} terms ({', '.join(places[:3])}"
    text += ", ..." if len(places) > 3 else ""
    return text + (")" if lineage["complete"] else "; gaps)")
