"""Survivors at one committed step move no model-sized data: DDP's constructor sync is off and a
fingerprint checks the states agree (spawned gloo processes on 127.0.0.1, no Ray)."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from elastictrain.runtime.context import Context
from elastictrain.runtime.state import FINGERPRINT_SAMPLES, ElasticState, agree_or_broadcast, fingerprint
from tests.gloo_ranks import run_ranks


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))


def _trained_state(seed: int) -> ElasticState:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    return ElasticState({"model": model, "optimizer": opt, "tokens": 0})


def _member(rank: int) -> dict:
    got = {}
    # 1. prepare_model wraps without DDP's constructor broadcast: ranks keep their own parameters
    session = types.SimpleNamespace(group=lambda name="world": dist.group.WORLD)
    world = types.SimpleNamespace(rank=rank, world_size=2, term=1, is_leader=rank == 0, member_id=f"m{rank}")
    ddp = Context(session, world, torch.device("cpu")).prepare_model(_model(seed=rank))
    got["kept_own_init"] = ddp.module[0].weight.flatten()[:3].tolist()
    # 2. survivors holding the same state agree; their own buffers and plain entries may differ
    same = _trained_state(seed=7)
    same.model[1].running_mean.add_(rank)  # each rank's running statistics from its own batches
    same.tokens = rank
    got["agreed"] = agree_or_broadcast(same, device=torch.device("cpu"))
    got["own_buffer_kept"] = same.model[1].running_mean[0].item()
    got["own_tokens_kept"] = same.tokens
    # 3. a rank holding another state (say a fresh initialisation) is found, and takes rank 0's
    other = _trained_state(seed=7 if rank == 0 else 8)
    got["disagreed"] = not agree_or_broadcast(other, device=torch.device("cpu"))
    got["now"] = fingerprint(other.agreed_tree()).tolist()
    return got


def test_survivors_keep_their_state_and_a_stranger_is_brought_in_line():
    got = run_ranks(_member, 2)
    a, b = got[0], got[1]
    assert a["kept_own_init"] != b["kept_own_init"]  # no parameter broadcast in DDP's constructor
    assert a["agreed"] and b["agreed"]
    assert (a["own_buffer_kept"], a["own_tokens_kept"]) != (b["own_buffer_kept"], b["own_tokens_kept"])
    assert a["disagreed"] and b["disagreed"] and a["now"] == b["now"]


def test_the_fingerprint_tells_states_apart_at_any_size_from_a_sample():
    one, two = _trained_state(seed=7), _trained_state(seed=7)
    assert torch.equal(fingerprint(one.agreed_tree()), fingerprint(two.agreed_tree()))
    two.step = 3
    assert not torch.equal(fingerprint(one.agreed_tree()), fingerprint(two.agreed_tree()))
    big = {"step": 0, "objects": {"w": torch.zeros(10_000_000)}}
    moved = {"step": 0, "objects": {"w": torch.zeros(10_000_000)}}
    moved["objects"]["w"][:: 10_000_000 // FINGERPRINT_SAMPLES] = 1.0  # what the strided sample reads
    assert not torch.equal(fingerprint(big), fingerprint(moved))
