"""The manifest: one signed JSON document per checkpoint, written last (the commit).

Layout of a stored checkpoint under its URI::

    run.json                          the run's id (written once)
    chunks/<id[:2]>/<id>              content-addressed chunks (sealed when encrypted)
    manifests/<step:012d>-<term:08d>.json

A manifest is canonical JSON (sorted keys, no spaces, ASCII)::

    {"body": {...}, "format": "elastictrain-checkpoint", "signature": {...}, "version": 1}

The body holds the run id, step, term, time, content size, the encryption
header (key id and wrapped data key, never the key), the tensor table (sealed
when encrypted: names, dtypes, shapes and the skeleton live only inside it),
the chunk list (ids and stored sizes, so retention and `verify` work without a
key), provenance (the saving node's labels), and, when recorded, the lineage of the steps since
the previous checkpoint and the saving node's attestation (`checkpoint.provenance`; absent in
manifests written before them, read as empty). The signature is Ed25519 over the canonical body when
encrypted, a SHA-256 digest of it otherwise. Pure: no storage, no torch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.provenance import check_attestation, check_lineage
from elastictrain.errors import CheckpointCorrupt, CheckpointError, UnsupportedFormat

FORMAT = "elastictrain-checkpoint"
VERSION = 1
RUN_FILE = "run.json"
MANIFEST_DIR = "manifests"
CHUNK_DIR = "chunks"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_STEP = 10**20 - 1  # for steps and terms: a manifest's name holds at most 20 digits of each
_MANIFEST_RE = re.compile(r"^manifests/(\d{12,20})-(\d{8,20})\.json$")
_CHUNK_RE = re.compile(r"^[0-9a-f]{64}$")
_RUN_RE = re.compile(r"^[0-9a-f]{32}$")
# Names the format version: a manifest of another version never verifies as this one's, which is how
# `decode_as_current` tells a damaged version field from a manifest a newer release wrote. A new
# VERSION must come with a new prefix.
_SIGNED_PREFIX = b"elastictrain/v1/manifest\x00"


def manifest_name(step: int, term: int) -> str:
    if not (0 <= step <= MAX_STEP and 0 <= term <= MAX_STEP):
        raise ValueError(f"step ({step}) and term ({term}) must be between 0 and {MAX_STEP}")
    return f"{MANIFEST_DIR}/{step:012d}-{term:08d}.json"


def parse_manifest_name(name: str) -> Optional[tuple[int, int]]:
    """(step, term) of a manifest name, or None for anything else (temp files, path tricks)."""
    m = _MANIFEST_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_chunk_id(cid: object) -> str:
    if not isinstance(cid, str) or not _CHUNK_RE.match(cid):
        raise CheckpointCorrupt(f"chunk id {str(cid)[:80]!r} is not 64 hex digits")
    return cid


def chunk_path(cid: str) -> str:
    check_chunk_id(cid)
    return f"{CHUNK_DIR}/{cid[:2]}/{cid}"


def is_chunk_path(name: str) -> bool:
    """True for a name `chunk_path` could have made (anything else under chunks/ is not ours)."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == CHUNK_DIR and bool(_CHUNK_RE.match(parts[2])) and parts[1] == parts[2][:2]


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise CheckpointCorrupt(f"manifest field {what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointCorrupt(f"manifest field {what} is not base64") from None


@dataclass(frozen=True)
class Table:
    """The tensor table: the safetensors prefix and which chunk holds each piece of the data section."""

    header: bytes
    pieces: tuple[tuple[int, int], ...]  # (index into the chunk list, plaintext length), in data order

    def to_json(self) -> dict:
        return {"header": _b64(self.header), "pieces": [list(p) for p in self.pieces]}

    @staticmethod
    def from_json(doc: object, n_chunks: int) -> "Table":
        if not isinstance(doc, dict) or set(doc) != {"header", "pieces"} or not isinstance(doc["pieces"], list):
            raise CheckpointCorrupt("tensor table is malformed")
        pieces = []
        for p in doc["pieces"]:
            if not (isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)):
                raise CheckpointCorrupt("tensor table piece is malformed")
            if not (0 <= p[0] < n_chunks and p[1] >= 0):
                raise CheckpointCorrupt("tensor table piece points outside the chunk list")
            pieces.append((p[0], p[1]))
        return Table(_unb64(doc["header"], "table.header"), tuple(pieces))


@dataclass(frozen=True)
class Body:
    """What a manifest says about its checkpoint (see the module docstring)."""

    run: str
    step: int
    term: int
    time_ns: int
    content_bytes: int
    chunks: tuple[tuple[str, int], ...]
    table: Optional[Table] = None  # plaintext table (unencrypted checkpoints)
    sealed_table: Optional[bytes] = None  # nonce || AES-GCM(table JSON)
    key_id: Optional[str] = None
    wrapped_key: Optional[bytes] = None
    provenance: dict[str, str] = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)  # who produced the steps since the previous checkpoint
    attestation: dict = field(default_factory=dict)  # the saving node's signed identity from its cloud

    @property
    def encrypted(self) -> bool:
        return self.key_id is not None

    @property
    def name(self) -> str:
        return manifest_name(self.step, self.term)

    def wrap_context(self) -> bytes:
        return wrap_context(self.run)

    def table_aad(self) -> bytes:
        return b"elastictrain/v1/table\x00" + canonical([self.run, self.step, self.term, list(map(list, self.chunks))])

    def to_json(self) -> dict:
        doc: dict[str, Any] = {
            "run": self.run,
            "step": self.step,
            "term": self.term,
            "time_ns": self.time_ns,
            "content_bytes": self.content_bytes,
            "chunks": [list(c) for c in self.chunks],
            "provenance": dict(self.provenance),
            "encryption": None,
        }
        # written only when recorded: a body without them reads (and signs) as before they existed
        if self.lineage:
            doc["lineage"] = self.lineage
        if self.attestation:
            doc["attestation"] = dict(self.attestation)
        if self.encrypted:
            doc["encryption"] = {"scheme": "aes-256-gcm", "key_id": self.key_id, "wrapped_key": _b64(self.wrapped_key)}
            doc["table"] = {"sealed": _b64(self.sealed_table)}
        else:
            doc["table"] = self.table.to_json()
        return doc

    @staticmethod
    def from_json(doc: object) -> "Body":
        if not isinstance(doc, dict):
            raise CheckpointCorrupt("manifest body is not an object")
        expected = {"run", "step", "term", "time_ns", "content_bytes", "chunks", "provenance", "encryption", "table"}
        if not expected <= set(doc) <= expected | {"lineage", "attestation"}:
            raise CheckpointCorrupt(f"manifest body fields {sorted(doc)[:20]} are not {sorted(expected)} "
                                    "(and optionally lineage, attestation)")
        for key in ("step", "term", "time_ns", "content_bytes"):
            if type(doc[key]) is not int or doc[key] < 0:
                raise CheckpointCorrupt(f"manifest field {key} is not a non-negative integer")
        if not isinstance(doc["run"], str) or not _RUN_RE.match(doc["run"]):
            raise CheckpointCorrupt("manifest run id is malformed")
        chunks = []
        if not isinstance(doc["chunks"], list):
            raise CheckpointCorrupt("manifest chunk list is malformed")
        for c in doc["chunks"]:
            if not (isinstance(c, list) and len(c) == 2 and type(c[1]) is int and c[1] >= 0):
                raise CheckpointCorrupt("manifest chunk entry is malformed")
            chunks.append((check_chunk_id(c[0]), c[1]))
        prov = doc["provenance"]
        if not isinstance(prov, dict) or not all(isinstance(v, str) for v in prov.values()):
            raise CheckpointCorrupt("manifest provenance is not a string map")
        base = dict(
            run=doc["run"], step=doc["step"], term=doc["term"], time_ns=doc["time_ns"],
            content_bytes=doc["content_bytes"], chunks=tuple(chunks), provenance=prov,
            lineage=check_lineage(doc.get("lineage", {})), attestation=check_attestation(doc.get("attestation", {})),
        )
        enc, table = doc["encryption"], doc["table"]
        if enc is None:
            return Body(**base, table=Table.from_json(table, len(chunks)))
        if not (isinstance(enc, dict) and set(enc) == {"scheme", "key_id", "wrapped_key"}):
            raise CheckpointCorrupt("manifest encryption header is malformed")
        if enc["scheme"] != "aes-256-gcm" or not isinstance(enc["key_id"], str):
            raise CheckpointCorrupt("manifest encryption scheme or key id is malformed")
        if not (isinstance(table, dict) and set(table) == {"sealed"}):
            raise CheckpointCorrupt("sealed tensor table is malformed")
        return Body(
            **base, key_id=enc["key_id"], wrapped_key=_unb64(enc["wrapped_key"], "wrapped_key"),
            sealed_table=_unb64(table["sealed"], "table"),
        )


def wrap_context(run: str) -> bytes:
    """What a wrapped data key is bound to: its run (key sources add their key id)."""
    return b"run:" + run.encode() + b";key:"


def seal_table(body: Body, table: Table, keys: crypto.DataKeys, nonce: bytes) -> bytes:
    """Encrypt the tensor table, bound to the run, step, term and chunk list."""
    return crypto.seal_blob(keys.table_aead, canonical(table.to_json()), body.table_aad(), nonce)


def open_table(body: Body, keys: Optional[crypto.DataKeys]) -> Table:
    """The body's tensor table, decrypted and checked."""
    if not body.encrypted:
        return body.table
    raw = crypto.open_blob(keys.table_aead, body.sealed_table, body.table_aad(), "tensor table")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointCorrupt("tensor table is not JSON") from None
    return Table.from_json(doc, len(body.chunks))


def encode_manifest(body: Body, signer: Optional[crypto.Signer]) -> bytes:
    """The manifest's stored bytes: signed with Ed25519 when a signer is given, digested otherwise."""
    message = _SIGNED_PREFIX + canonical(body.to_json())
    if signer is None:
        sig = {"alg": "sha256", "value": hashlib.sha256(message).hexdigest()}
    else:
        sig = {"alg": "ed25519", "key": signer.key_id, "value": _b64(signer.sign(message))}
    return canonical({"body": body.to_json(), "format": FORMAT, "signature": sig, "version": VERSION})


@dataclass(frozen=True)
class Decoded:
    body: Body
    alg: str
    signer_id: Optional[str]
    signature: bytes
    message: bytes


def decode_manifest(raw: bytes) -> Decoded:
    """Parse a manifest's bytes and check its structure and digest (not yet its Ed25519 signature).

    Raises:
        UnsupportedFormat: another format or version.
        CheckpointCorrupt: anything malformed, or a digest that does not match.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointCorrupt("manifest is too large")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointCorrupt("manifest is not valid JSON (truncated or damaged)") from None
    if not isinstance(doc, dict):
        raise CheckpointCorrupt("manifest is not a JSON object")
    if doc.get("format") != FORMAT:
        raise UnsupportedFormat(f"not an elastictrain checkpoint manifest (format {str(doc.get('format'))[:40]!r})")
    if doc.get("version") != VERSION:
        raise UnsupportedFormat(
            f"manifest format version {str(doc.get('version'))[:20]} is not supported (this release reads "
            f"version {VERSION}): upgrade elastictrain"
        )
    try:
        if canonical(doc) != raw:
            raise CheckpointCorrupt("manifest bytes are not canonical (altered)")
    except (TypeError, ValueError, RecursionError):  # RecursionError: parsed, but nested too deep to write
        raise CheckpointCorrupt("manifest holds values JSON cannot round-trip") from None
    if set(doc) != {"body", "format", "signature", "version"}:
        raise CheckpointCorrupt("manifest has unexpected top-level fields")
    body = Body.from_json(doc["body"])
    sig = doc["signature"]
    message = _SIGNED_PREFIX + canonical(doc["body"])
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise CheckpointCorrupt("manifest signature is malformed")
    if sig.get("alg") == "sha256" and set(sig) == {"alg", "value"}:
        if body.encrypted:
            raise CheckpointCorrupt("encrypted manifest carries no signature")
        if sig["value"] != hashlib.sha256(message).hexdigest():
            raise CheckpointCorrupt("manifest digest does not match (damaged)")
        return Decoded(body, "sha256", None, b"", message)
    if sig.get("alg") == "ed25519" and set(sig) == {"alg", "key", "value"} and isinstance(sig["key"], str):
        return Decoded(body, "ed25519", sig["key"], _unb64(sig["value"], "signature"), message)
    raise CheckpointCorrupt("manifest signature algorithm is unknown")


def decode_as_current(raw: bytes) -> Optional[Decoded]:
    """A manifest refused as another format or version, decoded as if those two fields read this version's.

    The digest or signature covers the body under a prefix naming the version, so what a newer
    release wrote does not verify here: a result means this version's manifest with a damaged
    format or version field. None when it does not decode that way either. The caller still
    checks the Ed25519 signature (`check_signature`), as for any manifest.
    """
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or (doc.get("format"), doc.get("version")) == (FORMAT, VERSION):
        return None
    doc["format"], doc["version"] = FORMAT, VERSION
    try:
        return decode_manifest(canonical(doc))
    except (CheckpointError, TypeError, ValueError, RecursionError):
        return None


def check_signature(decoded: Decoded, signer: crypto.Signer) -> None:
    """Raise CheckpointCorrupt unless `signer` signed this manifest."""
    if decoded.alg != "ed25519":
        raise CheckpointCorrupt("manifest is not signed")
    if decoded.signer_id != signer.key_id or not signer.verify(decoded.signature, decoded.message):
        raise CheckpointCorrupt(
            f"manifest signature does not verify (signed by {decoded.signer_id}, expected {signer.key_id})"
        )


def encode_run(run: str) -> bytes:
    return canonical({"format": FORMAT + "-run", "run": run, "version": VERSION})


def decode_run(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointCorrupt(f"{RUN_FILE} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT + "-run":
        raise CheckpointCorrupt(f"{RUN_FILE} is not an elastictrain run file")
    if doc.get("version") != VERSION:
        raise UnsupportedFormat(f"{RUN_FILE} version {str(doc.get('version'))[:20]} is not supported")
    run = doc.get("run")
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise CheckpointCorrupt(f"{RUN_FILE} run id is malformed")
    return run
