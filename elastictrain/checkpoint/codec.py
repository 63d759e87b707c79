"""Safetensors bytes: the logical content of a checkpoint, built without copying tensor data.

A checkpoint's content is exactly one safetensors serialisation: an 8-byte
little-endian header length, a JSON header (names, dtypes, shapes, offsets, and
string metadata), then every tensor's bytes back to back. This module builds
and parses the header and exposes each tensor's bytes as a zero-copy
memoryview, so the writer can hash and seal straight from tensor memory.
Pure: imports torch for dtypes only, no storage.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from elastictrain.errors import CheckpointCorrupt

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the largest tensor table read
MAX_WRITTEN_HEADER_BYTES = 100_000_000  # the largest written: safetensors reads no larger (exports load)

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
CODES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the content: where its bytes lie in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def check_name(name: object) -> str:
    """Return `name` if it can name a tensor; raise ValueError otherwise."""
    if not isinstance(name, str) or not name or name == METADATA_KEY or "\x00" in name:
        raise ValueError(f"tensor name {name!r} is not allowed: use a non-empty string without NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tensor name {name!r} is not valid UTF-8 (a lone surrogate?)") from None
    return name


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview, without a copy (the tensor must be contiguous on CPU)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def plan_entries(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """Lay tensors out back to back in the given order.

    Raises:
        ValueError: a name that cannot name a tensor, or an entry that is not a dense tensor with data of a
            dtype safetensors stores.
    """
    entries, offset = [], 0
    for name, tensor in tensors.items():
        check_name(name)
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.dtype not in DTYPES:
            what = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"state entry {name!r} is not a dense tensor of a storable dtype ({what})")
        if tensor.is_meta:
            raise ValueError(f"state entry {name!r} is on the meta device: it holds no data to save")
        nbytes = tensor.nbytes
        entries.append(TensorEntry(name, DTYPES[tensor.dtype], tuple(tensor.shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def encode_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """The safetensors prefix (length + JSON header, space-padded to 8 bytes) for `entries`.

    Raises:
        ValueError: the header would be larger than safetensors (and so this module) reads.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + 8) % 8)
    if len(text) > MAX_WRITTEN_HEADER_BYTES:
        raise ValueError(
            f"the tensor table would take {len(text)} bytes, over the {MAX_WRITTEN_HEADER_BYTES} that safetensors "
            "reads: keep large non-tensor values (say, a list of sample indices) out of the state, or make them "
            "tensors"
        )
    return struct.pack("<Q", len(text)) + text


def check_header_size(entries: list[TensorEntry], metadata: dict[str, str]) -> None:
    """Raise ValueError (as `encode_header` would) if the header would be over MAX_WRITTEN_HEADER_BYTES.

    Cheap where it matters: an upper bound of the size (every character escaped six-fold, every number
    20 digits), and the header itself only when that bound is over the limit.
    """
    bound = 32 + sum(6 * (len(k) + len(v)) + 8 for k, v in metadata.items())
    bound += sum(6 * len(e.name) + 21 * len(e.shape) + 106 for e in entries)
    if bound > MAX_WRITTEN_HEADER_BYTES:
        encode_header(entries, metadata)


def decode_header(prefix: bytes) -> tuple[list[TensorEntry], dict[str, str], int]:
    """Parse a safetensors prefix into entries, metadata and the data section's length.

    Raises:
        CheckpointCorrupt: the header is malformed (bad JSON, unknown dtype, holes or overlaps).
    """
    if len(prefix) < 8:
        raise CheckpointCorrupt("tensor table is truncated")
    (size,) = struct.unpack("<Q", prefix[:8])
    if size > MAX_HEADER_BYTES or len(prefix) != 8 + size:
        raise CheckpointCorrupt("tensor table length does not match its header")
    try:
        doc = json.loads(prefix[8:].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise CheckpointCorrupt(f"tensor table is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CheckpointCorrupt("tensor table is not a JSON object")
    metadata = doc.pop(METADATA_KEY, {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointCorrupt("tensor table metadata is not a string map")
    entries = []
    for name, info in doc.items():
        try:
            check_name(name)
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in CODES or not isinstance(shape, list) or not all(_count(d) for d in shape):
                raise ValueError("bad dtype or shape")
            if not (_count(begin) and _count(end) and begin <= end):
                raise ValueError("bad offsets")
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointCorrupt(f"tensor table entry {name!r} is malformed: {exc}") from None
        entry = TensorEntry(name, dtype, tuple(shape), begin, end)
        numel = 1
        for d in entry.shape:
            numel *= d
        if not _count(numel) or numel * torch.empty((), dtype=CODES[dtype]).element_size() != entry.nbytes:
            raise CheckpointCorrupt(f"tensor {name!r}: shape and byte length disagree")
        entries.append(entry)
    entries.sort(key=lambda e: (e.begin, e.end))
    offset = 0
    for e in entries:
        if e.begin != offset:
            raise CheckpointCorrupt(f"tensor {e.name!r} does not follow the previous one (hole or overlap)")
        offset = e.end
    return entries, metadata, offset


def _count(value: object) -> bool:
    """An int a tensor size or offset can be: not a bool, 0 <= value < 2**63 (what torch can hold)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def empty_tensor(entry: TensorEntry) -> torch.Tensor:
    """A flat uint8 tensor to receive `entry`'s bytes."""
    return torch.empty(entry.nbytes, dtype=torch.uint8)


def as_typed(raw: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """View filled uint8 storage as the entry's dtype and shape."""
    dtype = CODES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return raw.view(dtype).reshape(entry.shape)
