"""State trees flattened to named tensors and a JSON skeleton, and back."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.statetree import flatten_state, skeleton_from_json, skeleton_to_json, unflatten_state

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=8))
tensors = st.builds(lambda n, s: torch.arange(n, dtype=torch.float32) * s, st.integers(0, 5), st.floats(-3, 3))
keys = st.one_of(st.text("ab1/_.", min_size=1, max_size=4), st.integers(0, 12))  # "1" vs 1, "a/b" vs a -> b collide
trees = st.recursive(
    st.one_of(scalars, tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=20,
)


def _with_twins(tree, key):
    """`tree` next to two tensors whose names collide: 3 and "3", or "a/z" and "a" -> "z"."""
    twins = {key: torch.ones(1), str(key): torch.zeros(1)} if isinstance(key, int) else \
        {f"{key}/z": torch.ones(1), key: {"z": torch.zeros(1)}}
    return {"t": tree, "twins": twins}


trees_or_collisions = st.one_of(trees, st.builds(_with_twins, trees, keys))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _tensor_names(node, path: str) -> list[str]:
    """The name each tensor of a tree gets: the '/'-joined keys from the root (an independent oracle)."""
    if isinstance(node, torch.Tensor):
        return [path]
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in _tensor_names(v, f"{path}/{k}")]
    if isinstance(node, (list, tuple)):
        return [n for i, v in enumerate(node) for n in _tensor_names(v, f"{path}/{i}")]
    return []


@settings(max_examples=150, deadline=None)
@given(trees_or_collisions)
def test_round_trip_through_json(tree):
    twice = sorted(n for n, c in Counter(_tensor_names(tree, "root")).items() if c > 1)
    if twice:  # e.g. keys 1 and "1" flatten to the same name: refused, never mixed up
        with pytest.raises(ValueError, match="same name") as refused:
            flatten_state({"root": tree})
        assert any(repr(n) in str(refused.value) for n in twice)
        return
    tensors_, skeleton = flatten_state({"root": tree})
    back = unflatten_state(tensors_, skeleton_from_json(skeleton_to_json(skeleton)))
    assert _equal(back, {"root": tree})


def test_optimizer_state_keeps_int_keys_and_special_floats():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tree = {"optimizer": opt.state_dict(), "best": float("inf"), "nan": float("nan")}
    t, skel = flatten_state(tree)
    back = unflatten_state(t, skeleton_from_json(skeleton_to_json(skel)))
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert back["best"] == float("inf") and math.isnan(back["nan"])
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optimizer"])


def test_names_that_collide_or_objects_that_cannot_be_saved_are_refused():
    with pytest.raises(ValueError, match="same name"):
        flatten_state({1: torch.zeros(1), "1": torch.zeros(1)})
    with pytest.raises(TypeError, match="only tensors"):
        flatten_state({"f": object()})
    with pytest.raises(KeyError):
        unflatten_state({}, {"__tensor__": "missing"})


def test_numpy_scalars_come_back_as_the_same_numpy_type():
    tree = {"f32": np.float32(1.1), "f16": np.float16(-np.inf), "f64": np.float64("nan"), "i64": np.int64(-2**62),
            "u64": np.uint64(2**64 - 1), "i8": np.int8(-7), "b": np.bool_(True), "plain": 0.5}
    t, skel = flatten_state(tree)
    back = unflatten_state(t, skeleton_from_json(skeleton_to_json(skel)))
    assert t == {} and list(back) == list(tree)
    for name, value in tree.items():
        assert type(back[name]) is type(value), name
        assert back[name] == value or (math.isnan(value) and math.isnan(back[name])), name


@pytest.mark.parametrize("value", [np.complex64(1j), np.longdouble(1), np.datetime64("2020-01-01"), np.zeros(2)])
def test_numpy_values_that_json_cannot_hold_are_refused_by_name(value):
    with pytest.raises(TypeError, match=r"state entry x is a (numpy )?\w+"):
        flatten_state({"x": value})


@pytest.mark.parametrize("node", [{"__numpy__": "object", "value": 1}, {"__numpy__": "int8", "value": 300},
                                  {"__numpy__": "int64", "value": "1"}, {"__numpy__": ["f4"], "value": 1.0}])
def test_a_damaged_numpy_skeleton_node_is_refused(node):
    with pytest.raises(ValueError, match="numpy"):
        unflatten_state({}, node)
