"""The tensor layout a state broadcast announces, parsed and checked before anything is allocated.

A rank 0 announces its state as a JSON header: the skeleton and, per tensor, its name, shape, dtype
and home device. A receiver believes none of it blindly: dtypes come from an allow-list, and the
layout is compared with the receiver's own state. Model parameters and buffers must match its own
by name, shape and dtype; what it does not hold itself (optimizer state before its first step,
say) is capped by the size of what it does hold. So a rank 0 can neither make a receiver allocate
an arbitrary amount of memory nor hand it tensors its model does not have.
Pure: imports torch for dtypes only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

ALLOWED_DTYPES: Mapping[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                 "complex64", "complex128", "int64", "int32", "int16", "int8",
                 "uint64", "uint32", "uint16", "uint8", "bool")
    if isinstance(getattr(torch, name, None), torch.dtype)
}
"""The dtypes a state broadcast may carry, by the name the header uses (`str(dtype)` less "torch.")."""

HOMES = ("cpu", "cuda")
MAX_DIMS = 32


@dataclass(frozen=True)
class TensorSpec:
    """One announced tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    home: str

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class StateLimits:
    """How much a received state may exceed the receiver's own.

    Attributes:
        growth: the received state may take this many times the bytes of the receiver's own state in
            all, and a tensor the receiver does not hold (or holds at another shape) this many times
            its own largest tensor. AdamW's state is twice the parameters; 8 leaves room for others.
        floor_bytes: a received state up to this size is never refused for its size (a small model's
            optimizer state dwarfs its parameters).
    """

    growth: float = 8.0
    floor_bytes: int = 256 * 1024 * 1024

    def cap(self, own_bytes: int) -> int:
        return max(self.floor_bytes, int(self.growth * own_bytes))


@dataclass(frozen=True)
class OwnLayout:
    """What a receiver holds itself: its tensors by flattened name, and which entries are models.

    Attributes:
        tensors: name -> (shape, dtype) of the receiver's own flattened state.
        entries: the names the receiver registered with `ctx.state(...)`.
        modules: the entries that are models (their parameters and buffers must match exactly).
        lazy: tensor names of lazily initialised parameters (their shape is not known yet).
    """

    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    entries: frozenset[str]
    modules: frozenset[str]
    lazy: frozenset[str] = frozenset()

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], entries: Any, modules: Any) -> "OwnLayout":
        lazy = frozenset(n for n, t in tensors.items() if isinstance(t, torch.nn.parameter.UninitializedTensorMixin))
        return cls({n: (tuple(t.shape), t.dtype) for n, t in tensors.items() if n not in lazy},
                   frozenset(entries), frozenset(modules), lazy)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(shape, dtype) for shape, dtype in self.tensors.values())

    def entry_of(self, name: str) -> Optional[str]:
        """The registered entry a flattened tensor name belongs to (None: no entry of this rank's)."""
        if not name.startswith("objects/"):
            return None
        rest = name[len("objects/"):]
        for entry in self.entries:
            if rest == entry or rest.startswith(entry + "/"):
                return entry
        return None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def parse_header(raw: bytes) -> tuple[Any, list[TensorSpec]]:
    """The skeleton and the announced tensors from a broadcast header (JSON, never anything else).

    Raises:
        ValueError: the header is not JSON of the expected form, or a dtype is not in `ALLOWED_DTYPES`.
    """
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        skeleton, entries = header["skeleton"], header["layout"]
        if not isinstance(entries, list):
            raise ValueError("the layout is not a list")
        layout, seen = [], set()
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 4:
                raise ValueError(f"bad layout entry {str(entry)[:80]!r}")
            name, shape, dtype, home = entry
            if not isinstance(name, str) or name in seen:
                raise ValueError(f"bad or repeated tensor name {str(name)[:80]!r}")
            seen.add(name)
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {str(dtype)[:40]!r}, not one a state may carry "
                                 f"({', '.join(ALLOWED_DTYPES)})")
            if home not in HOMES:
                raise ValueError(f"tensor {name!r} lives on {str(home)[:40]!r}, not on {' or '.join(HOMES)}")
            if not isinstance(shape, list) or len(shape) > MAX_DIMS \
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a bad shape {str(shape)[:80]}")
            layout.append(TensorSpec(name, tuple(shape), ALLOWED_DTYPES[dtype], home))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"the state broadcast by rank 0 is malformed: {exc}") from None
    return skeleton, layout


def check_layout(announced: list[TensorSpec], own: OwnLayout, limits: StateLimits = StateLimits()) -> None:
    """Refuse an announced layout this receiver must not allocate; the error names the first mismatch.

    Raises:
        ValueError: a model tensor missing, extra, or of another shape or dtype than the receiver's own; a
            tensor of an entry the receiver did not register; a tensor or the whole state over `limits`.
    """
    own_bytes = own.nbytes
    largest = max((_nbytes(s, d) for s, d in own.tensors.values()), default=0)
    total_cap, tensor_cap = limits.cap(own_bytes), limits.cap(largest)
    total = 0
    announced_names = set()
    for spec in announced:
        announced_names.add(spec.name)
        entry = own.entry_of(spec.name)
        mine = own.tensors.get(spec.name)
        if entry is None and not spec.name.startswith("rng/"):
            raise ValueError(f"rank 0 announced tensor {spec.name!r}, which belongs to no entry this rank "
                             f"registered with ctx.state() ({', '.join(sorted(own.entries))})")
        if entry in own.modules and spec.name not in own.lazy:
            if mine is None:
                raise ValueError(f"rank 0 announced model tensor {spec.name!r}, which this rank's {entry!r} "
                                 "does not have: the models differ")
            if mine != (spec.shape, spec.dtype):
                raise ValueError(f"rank 0 announced model tensor {spec.name!r} as {_show(spec.shape, spec.dtype)}; "
                                 f"this rank's is {_show(*mine)}: the models differ")
        elif mine != (spec.shape, spec.dtype) and spec.nbytes > tensor_cap:
            raise ValueError(f"rank 0 announced tensor {spec.name!r} of {spec.nbytes} bytes "
                             f"({_show(spec.shape, spec.dtype)}), over the {tensor_cap} bytes this rank "
                             "accepts for a tensor it does not hold (StateLimits)")
        total += spec.nbytes
        if total > total_cap:
            raise ValueError(f"rank 0 announced a state of over {total_cap} bytes (at tensor {spec.name!r}); "
                             f"this rank's own state takes {own_bytes} (StateLimits)")
    for name in own.tensors:
        if own.entry_of(name) in own.modules and name not in announced_names:
            raise ValueError(f"rank 0 announced no tensor {name!r}, which this rank's model has: the models differ")


def _show(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"
