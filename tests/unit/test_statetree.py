"""State trees flattened to named tensors and a JSON skeleton, and back."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.statetree import flatten_state, skeleton_from_json, skeleton_to_json, unflatten_state

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=8))
tensors = st.builds(lambda n, s: torch.arange(n, dtype=torch.float32) * s, st.integers(0, 5), st.floats(-3, 3))
keys = st.one_of(st.text("abcxyz_.", min_size=1, max_size=5), st.integers(0, 50))
trees = st.recursive(
    st.one_of(scalars, tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=20,
)


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


@settings(max_examples=150, deadline=None)
@given(trees)
def test_round_trip_through_json(tree):
    try:
        tensors_, skeleton = flatten_state({"root": tree})
    except ValueError:
        return  # e.g. keys 1 and "1" flatten to the same name: refused, never mixed up
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
