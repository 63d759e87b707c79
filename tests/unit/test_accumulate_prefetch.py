"""Prefetch on the host: a pass-through with no copy, and nested containers mapped tensor by tensor."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import torch

from elastictrain.accumulate.prefetch import map_tensors, prefetch_to_device

Pair = namedtuple("Pair", "a b")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    meta: str


def test_cpu_and_none_pass_batches_through_unchanged():
    batches = [torch.ones(2), {"y": torch.zeros(1)}]
    for device in (None, "cpu", torch.device("cpu")):
        out = list(prefetch_to_device(iter(batches), device))
        assert out[0] is batches[0] and out[1] is batches[1]


def test_map_tensors_walks_nested_containers():
    obj = {"p": Pair(torch.ones(1), [torch.ones(2), 3]), "b": Batch(torch.ones(3), "m"), "s": "keep"}
    out = map_tensors(obj, lambda t: t * 2)
    assert isinstance(out["p"], Pair) and out["p"].a.tolist() == [2.0]
    assert out["p"].b[0].tolist() == [2.0, 2.0] and out["p"].b[1] == 3
    assert isinstance(out["b"], Batch) and out["b"].x.tolist() == [2.0] * 3 and out["b"].meta == "m"
    assert out["s"] == "keep"
