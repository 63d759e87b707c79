"""Rank 0's state reaches a behind or new member in large pieces, into the tensors it holds, with one
bucket of staging memory (spawned gloo processes on 127.0.0.1, no Ray). Buckets are shrunk to 64 KiB
so a small model exercises packing and splitting."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
import torch.distributed as dist

import elastictrain.runtime.transfer as transfer
from elastictrain.runtime.state import ElasticState, take_rank0_state
from tests.alloc_spy import spy_on_empty
from tests.gloo_ranks import run_ranks

CPU = torch.device("cpu")
BUCKET = 64 * 1024
DIRECT = 8 * 1024
BIG = 200 * 1024  # bytes of the one tensor larger than a bucket: 3 full pieces and one of 8 KiB
TINY = 2000
SLACK = 4 * 1024  # the header's size, and RNG states


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128),
                               torch.nn.Linear(128, BIG // 4 // 128), torch.nn.Linear(BIG // 4 // 128, 3))


def _state(seed: int, stepped: bool, tiny: float = 0.0) -> ElasticState:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    if stepped:  # AdamW's state (exp_avg, exp_avg_sq, a CPU step count) appears with its first step
        for _ in range(seed % 3 + 1):
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
    state = ElasticState({"model": model, "optimizer": opt, "tokens": seed,
                          "many": [torch.full((3,), tiny + i) for i in range(TINY)]})
    state.step = seed
    return state


def _digests(state: ElasticState) -> dict:
    """Every tensor of the state (RNG states included) by name: its dtype, device and a hash of its bytes."""
    tensors, skeleton = state.flatten()
    out = {n: [str(t.dtype), str(t.device), list(t.shape),
               hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()]
           for n, t in tensors.items()}
    return {"tensors": out, "skeleton": repr(skeleton), "step": state.step}


def _spy(log: list):
    """Count the bytes of every `torch.empty`: the transfer allocates through it, as the old path did."""
    return spy_on_empty(lambda dims, dtype, nbytes: log.append(nbytes))


def _take(state: ElasticState, rank: int) -> dict:
    """take_rank0_state with broadcasts and allocations counted on this rank."""
    sizes, allocated = [], []
    real_broadcast = dist.broadcast

    def broadcast(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return real_broadcast(tensor, *args, **kwargs)

    dist.broadcast = broadcast
    real_empty = _spy(allocated) if rank else torch.empty
    try:
        with transfer.recording() as stats:
            take_rank0_state(state, device=CPU)
    finally:
        dist.broadcast, torch.empty = real_broadcast, real_empty
    header = sizes[1] if rank else 0  # the JSON header's receive buffer (names and skeleton), not tensors
    return {"broadcasts": sizes, "allocated": sum(allocated) - header, "staging": stats.staging_bytes,
            "in_place_bytes": stats.in_place_bytes, "allocated_by_transfer": stats.allocated_bytes}


def _ids(state: ElasticState) -> dict:
    opt = state.optimizer
    return {"params": [(id(p), p.data_ptr()) for p in state.model.parameters()],
            "opt": sorted((n, k, v.data_ptr()) for n, (p, s) in enumerate(opt.state.items()) for k, v in s.items()),
            "buffers": [b.data_ptr() for b in state.model.buffers()]}


def _member(rank: int) -> dict:
    transfer.BUCKET_BYTES, transfer.DIRECT_BYTES = BUCKET, DIRECT
    got = {}
    # 1. a new member: a fresh model, an optimizer that has not stepped, other plain entries and RNG
    state = _state(seed=7, stepped=True, tiny=0.5) if rank == 0 else _state(seed=20 + rank, stepped=False)
    random.seed(rank)
    torch.manual_seed(100 + rank)
    before = _ids(state)
    got["fresh"] = _take(state, rank)
    got["fresh"].update(digests=_digests(state), draw=torch.rand(4).tolist(), py_draw=random.random(),
                        params_kept=_ids(state)["params"] == before["params"],
                        opt_state_bytes=sum(v.numel() * v.element_size() for s in state.optimizer.state.values()
                                            for v in s.values()),
                        tokens=state.tokens)
    # 2. a member behind: it holds every tensor (its optimizer stepped), so everything lands in place
    state = _state(seed=7, stepped=True, tiny=0.5) if rank == 0 else _state(seed=11, stepped=True)
    state.model[1].running_mean.add_(rank)
    before = _ids(state)
    got["behind"] = _take(state, rank)
    got["behind"].update(digests=_digests(state), same_storage=_ids(state) == before)
    return got


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_member, 2)


def test_a_new_member_ends_up_with_rank_0s_state_bit_for_bit(ranks):
    sender, receiver = ranks[0]["fresh"], ranks[1]["fresh"]
    assert receiver["digests"] == sender["digests"]
    assert receiver["digests"]["step"] == 7 and receiver["tokens"] == 7
    steps = [d for n, d in receiver["digests"]["tensors"].items() if n.endswith("/step")]
    assert steps and all(d[:2] == ["torch.float32", "cpu"] for d in steps)  # AdamW's step counts stay on the CPU
    assert receiver["draw"] == sender["draw"] and receiver["py_draw"] == sender["py_draw"]  # RNG states too
    assert receiver["params_kept"] and receiver["opt_state_bytes"] > BIG


def test_a_member_behind_receives_into_the_tensors_it_holds(ranks):
    sender, receiver = ranks[0]["behind"], ranks[1]["behind"]
    assert receiver["digests"] == sender["digests"]
    # parameters, buffers and optimizer state are the same storage as before: no second copy was made
    assert receiver["same_storage"]
    assert receiver["allocated_by_transfer"] < SLACK  # only the RNG states it never holds as its own
    assert receiver["allocated"] <= BUCKET + SLACK, receiver["allocated"]


def test_a_new_member_allocates_only_what_it_lacks_plus_one_bucket(ranks):
    receiver = ranks[1]["fresh"]
    assert receiver["staging"] <= BUCKET
    assert receiver["allocated"] <= receiver["opt_state_bytes"] + BUCKET + SLACK, receiver


def test_many_small_tensors_take_few_broadcasts_and_a_large_one_is_split(ranks):
    for rank in (0, 1):
        sizes = ranks[rank]["fresh"]["broadcasts"]
        state_bytes = sum(sizes[2:])  # after the header's size and bytes
        assert max(sizes[2:]) <= BUCKET
        # 2000 tiny tensors and a few dozen AdamW ones in about as many broadcasts as the bytes need
        assert len(sizes) <= 2 + state_bytes // BUCKET + 8, sizes
        assert len(sizes) < TINY // 10
        # the 200 KiB weight and its two AdamW moments travel as 3 full pieces and a 8 KiB tail each
        assert sizes.count(BIG % BUCKET) >= 3 and sizes.count(BUCKET) >= 9, sizes
