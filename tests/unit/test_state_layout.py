"""What a receiver of a state broadcast accepts: the header's form, dtypes, and the layout against its own."""

from __future__ import annotations

import json

import pytest
import torch

from elastictrain.runtime.layout import ALLOWED_DTYPES, StateLimits, TensorSpec, check_layout, parse_header
from elastictrain.runtime.state import ElasticState
from elastictrain.statetree import flatten_state

NO_FLOOR = StateLimits(growth=8.0, floor_bytes=0)


def _state(trained: bool) -> ElasticState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    if trained:
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    return ElasticState({"model": model, "optimizer": opt, "tokens": torch.zeros(3)})


def _announced(state: ElasticState) -> list[TensorSpec]:
    tensors, _ = flatten_state(state.tree())
    return [TensorSpec(n, tuple(t.shape), t.dtype, t.device.type) for n, t in tensors.items()]


def _header(layout, skeleton=None) -> bytes:
    return json.dumps({"skeleton": skeleton, "layout": layout}).encode()


def test_a_trained_adamw_state_passes_a_fresh_receivers_check_without_the_floor():
    check_layout(_announced(_state(trained=True)), _state(trained=False).layout(), NO_FLOOR)


def test_the_total_is_capped_even_when_each_tensor_is_under_the_tensor_cap():
    own = _state(trained=False).layout()
    largest = max(s.nbytes for s in _announced(_state(trained=False)))
    piece = [TensorSpec(f"objects/optimizer/state/{i}/x", (largest // 4,), torch.float32, "cpu") for i in range(10_000)]
    with pytest.raises(ValueError, match="a state of over .* bytes"):
        check_layout(_announced(_state(trained=True)) + piece, own, NO_FLOOR)
    check_layout(_announced(_state(trained=True)) + piece[:2], own, NO_FLOOR)  # a few are fine


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop(0), "announced no tensor 'objects/model/0.weight'"),
    (lambda a: a.append(TensorSpec("objects/other/w", (2,), torch.float32, "cpu")), "belongs to no entry"),
    (lambda a: a.append(TensorSpec("elsewhere", (2,), torch.float32, "cpu")), "belongs to no entry"),
    (lambda a: a.__setitem__(0, TensorSpec("objects/model/0.weight", (64, 64), torch.float64, "cpu")),
     r"as float64\[64, 64\]; this rank's is float32\[64, 64\]"),
    (lambda a: a.append(TensorSpec("objects/tokens", (1 << 40,), torch.uint8, "cpu")), "accepts for a tensor"),
])
def test_layouts_the_receiver_must_not_take_name_the_first_mismatch(edit, message):
    announced = _announced(_state(trained=True))
    edit(announced)
    with pytest.raises(ValueError, match=message):
        check_layout(announced, _state(trained=False).layout())


def test_a_plain_tensor_entry_may_change_shape_within_the_caps():
    announced = [s if s.name != "objects/tokens" else TensorSpec(s.name, (100,), torch.float32, "cpu")
                 for s in _announced(_state(trained=True))]
    check_layout(announced, _state(trained=False).layout(), NO_FLOOR)


def test_a_lazy_parameter_takes_the_announced_shape():
    lazy = ElasticState({"model": torch.nn.LazyLinear(3)})
    check_layout([TensorSpec("objects/model/weight", (3, 5), torch.float32, "cpu"),
                  TensorSpec("objects/model/bias", (3,), torch.float32, "cpu")], lazy.layout())


@pytest.mark.parametrize("raw, message", [
    (b"\x80\x04K\x01.", "malformed"),  # a pickle
    (b"[]", "not a JSON object"),
    (_header([["w", [2], "float32", "cpu"], ["w", [2], "float32", "cpu"]]), "repeated"),
    (_header([["w", [2], "Tensor", "cpu"]]), "dtype 'Tensor'"),
    (_header([["w", [2], "qint8", "cpu"]]), "dtype 'qint8'"),
    (_header([["w", [2], "float32", "meta"]]), "lives on 'meta'"),
    (_header([["w", [-1], "float32", "cpu"]]), "bad shape"),
    (_header([["w", [True], "float32", "cpu"]]), "bad shape"),
    (_header([["w", [1] * 33, "float32", "cpu"]]), "bad shape"),
    (_header([["w", [2], "float32"]]), "bad layout entry"),
    (_header({"w": 1}), "not a list"),
])
def test_malformed_headers_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_header(raw)


def test_every_allowed_dtype_is_a_plain_numeric_dtype():
    assert "float32" in ALLOWED_DTYPES and "bfloat16" in ALLOWED_DTYPES
    assert all(not d.is_complex or d in (torch.complex64, torch.complex128) for d in ALLOWED_DTYPES.values())
    assert "complex32" not in ALLOWED_DTYPES and "qint8" not in ALLOWED_DTYPES


def test_a_refused_state_ends_the_run_as_an_error_not_a_rebuild():
    from elastictrain.errors import StateRefused
    from elastictrain.runtime.runner import USER_ERROR, classify_exit

    refused = StateRefused("refused the state rank 0 broadcast: the models differ")
    assert isinstance(refused, ValueError) and classify_exit(refused) == USER_ERROR
