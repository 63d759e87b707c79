"""Flatten nested training state into named tensors plus a JSON skeleton, and back.

The elastic state (model, optimizer, scheduler, RNG, step, user extras) is a tree
of dicts, lists and tuples whose leaves are tensors or plain values. Broadcasts
and checkpoints move the tensors as a flat ``{name: tensor}`` mapping (the shape
safetensors stores) and the rest as a JSON skeleton that names each tensor.
Pure: imports torch only for the tensor type.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"
_NUMPY = "__numpy__"
_SCALARS = (int, float, str, bool, type(None))
# numpy scalar kinds kept as JSON scalars: bool, signed and unsigned ints, floats up to 64 bits (exact in a double)
_NUMPY_KINDS = {"b": bool, "i": int, "u": int, "f": float}


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state tree into ``(tensors, skeleton)``.

    Tensor names are the '/'-joined path of keys from the root. The skeleton is
    JSON-serialisable and holds every non-tensor leaf.

    Raises:
        TypeError: a leaf is neither a tensor nor a JSON scalar.

    >>> t, s = flatten_state({"w": torch.zeros(2), "step": 3})
    >>> sorted(t), s
    (['w'], {'__dict__': [['w', {'__tensor__': 'w'}], ['step', 3]]})
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, prefix, tensors)
    return tensors, skeleton


def _flatten(node: Any, path: str, out: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        name = path or "tensor"
        if name in out:
            raise ValueError(f"two state entries flatten to the same name {name!r}")
        out[name] = node
        return {_TENSOR: name}
    if isinstance(node, dict):
        items = []
        for key, value in node.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"state key {key!r} at {path or '<root>'} must be str or int")
            child = f"{path}/{key}" if path else str(key)
            items.append([key, _flatten(value, child, out)])
        return {_DICT: items}
    if isinstance(node, (list, tuple)):
        children = [_flatten(v, f"{path}/{i}" if path else str(i), out) for i, v in enumerate(node)]
        return {_TUPLE: children} if isinstance(node, tuple) else children
    numpy = sys.modules.get("numpy")  # no numpy value can exist unless numpy was imported
    if numpy is not None and isinstance(node, numpy.generic):
        return _flatten_numpy(node, path, numpy)
    if isinstance(node, float) and node != node:  # NaN survives JSON only as a marker
        return {"__float__": "nan"}
    if isinstance(node, float) and node in (float("inf"), float("-inf")):
        return {"__float__": "inf" if node > 0 else "-inf"}
    if isinstance(node, _SCALARS):
        return node
    hint = "; convert numpy arrays with torch.from_numpy" if numpy is not None and isinstance(node, numpy.ndarray) else ""
    raise TypeError(
        f"state entry {path or '<root>'} is a {type(node).__name__}; "
        f"only tensors, dicts, lists, tuples, JSON scalars and numpy scalars can be saved{hint}"
    )


def _flatten_numpy(node: Any, path: str, numpy: Any) -> Any:
    """A numpy scalar as its dtype name and a JSON value, so it comes back as the same numpy type."""
    dtype = node.dtype
    convert = _NUMPY_KINDS.get(dtype.kind)
    if convert is None or (dtype.kind == "f" and dtype.itemsize > 8):
        raise TypeError(
            f"state entry {path or '<root>'} is a numpy {dtype.name}; only numpy bools, ints and floats "
            "up to 64 bits can be saved (store it as a tensor or a Python value)"
        )
    return {_NUMPY: dtype.name, "value": _flatten(convert(node.item()), path, {})}


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the tree that `flatten_state` split.

    Raises:
        KeyError: the skeleton names a tensor that `tensors` lacks.
    """
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, v) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            name = skeleton[_TENSOR]
            if name not in tensors:
                raise KeyError(f"state tensor {name!r} is missing")
            return tensors[name]
        if _DICT in skeleton:
            return {k: unflatten_state(tensors, v) for k, v in skeleton[_DICT]}
        if _TUPLE in skeleton:
            return tuple(unflatten_state(tensors, v) for v in skeleton[_TUPLE])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        if _NUMPY in skeleton:
            return _numpy_scalar(skeleton[_NUMPY], unflatten_state(tensors, skeleton.get("value")))
        raise ValueError(f"unknown skeleton node {sorted(skeleton)}")
    return skeleton


def _numpy_scalar(dtype_name: Any, value: Any) -> Any:
    import numpy

    try:
        dtype = numpy.dtype(dtype_name) if isinstance(dtype_name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _NUMPY_KINDS or (dtype.kind == "f" and dtype.itemsize > 8):
        raise ValueError(f"unknown numpy scalar type {dtype_name!r} in the state skeleton")
    if not isinstance(value, (bool, int, float)):
        raise ValueError(f"numpy {dtype.name} scalar in the state skeleton holds a {type(value).__name__}")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError):
        raise ValueError(f"numpy {dtype.name} scalar in the state skeleton is out of range") from None


def skeleton_to_json(skeleton: Any) -> str:
    """Serialise a skeleton deterministically (sorted nothing: order is part of the state)."""
    return json.dumps(skeleton, separators=(",", ":"), allow_nan=False)


def skeleton_from_json(text: str) -> Any:
    return json.loads(text)
