"""Checkpoints of GPU state: the snapshot into pinned host buffers, incremental saves and restores;
skipped without CUDA (run by benchmarks/device_check.sh on a GPU machine)."""

from __future__ import annotations

import uuid

import pytest
import torch

from elastictrain.checkpoint import CheckpointManager
from elastictrain.config import CheckpointConfig, EncryptionConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

KEY = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # 32 bytes, base64


def _mgr(**overrides) -> CheckpointManager:
    cfg = dict(uri=f"memory://ckpt-cuda-{uuid.uuid4().hex}", chunk_size_mb=1, async_save=True)
    cfg.update(overrides)
    return CheckpointManager(CheckpointConfig(**cfg), environ={"CKPT_KEY": KEY})


def _state(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "w": torch.randn(1024, 1024, device=device, generator=g),  # 4 MiB: four pieces
        "bf16": torch.randn(3000, device=device, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(777, device=device, generator=g).to(torch.float16),
        "ids": torch.arange(5000, device=device, dtype=torch.int64),
        "mask": torch.rand(333, device=device, generator=g) > 0.5,
        "wt": torch.randn(64, 48, device=device, generator=g).t(),  # not contiguous
        "scalar": torch.tensor(3.5, device=device),
        "empty": torch.empty(0, 4, device=device),
    }


def _bump(state: dict[str, torch.Tensor]) -> None:
    for t in state.values():
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)


@pytest.mark.parametrize("encrypted", [False, True])
def test_async_save_of_gpu_state_is_taken_before_save_returns(encrypted):
    enc = EncryptionConfig(key="env:CKPT_KEY") if encrypted else None
    state = _state("cuda")
    expected = {k: v.to("cpu", copy=True) for k, v in state.items()}
    expected["w"] = expected["w"] * 2.0
    # work still queued on the current stream when save() is called: the snapshot must see its result,
    # and the background save must not read the pinned buffers before the copies land
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the copies
    state["w"].mul_(2.0)
    with _mgr(encryption=enc) as mgr:
        mgr.save(state, None, step=1, term=0)
        _bump(state)  # training goes on in place while the save runs in the background
        mgr.wait()
        buffers = mgr._snapshotter._buffers
        assert all(b.is_pinned() for b in buffers.values() if b.numel())
        loaded = mgr.latest()
    assert set(loaded.tensors) == set(expected)
    for k, v in expected.items():
        got = loaded.tensors[k]
        assert got.device.type == "cpu" and got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got, v), k


def test_incremental_save_from_gpu_writes_only_what_changed_and_reuses_pinned_buffers():
    state = _state("cuda")
    with _mgr() as mgr:
        mgr.save(state, None, step=1, term=0)
        mgr.wait()
        full = mgr.reports[-1]
        first_buffers = {k: b.data_ptr() for k, b in mgr._snapshotter._buffers.items()}
        state["ids"].add_(1)  # 40 KB of about 4.2 MB
        mgr.save(state, None, step=2, term=0)
        mgr.wait()
        inc = mgr.reports[-1]
        assert {k: b.data_ptr() for k, b in mgr._snapshotter._buffers.items()} == first_buffers
        assert inc.chunks_written == 1, inc
        assert inc.bytes_written < 0.05 * full.bytes_written, (inc, full)
        restored = mgr.latest().tensors
    assert all(torch.equal(restored[k], v.cpu()) for k, v in state.items())


def test_restore_into_gpu_tensors_gives_cpu_tensors_and_leaves_the_gpu_ones_alone():
    state = _state("cuda")
    with _mgr(async_save=False) as mgr:
        mgr.save(state, None, step=1, term=0)
        live = {k: v.clone() for k, v in state.items()}
        _bump(live)
        before = {k: v.to("cpu", copy=True) for k, v in live.items()}
        loaded = mgr.latest(into=live)
    assert all(loaded.tensors[k].device.type == "cpu" for k in state)
    assert all(torch.equal(loaded.tensors[k], v.cpu()) for k, v in state.items())
    assert all(torch.equal(live[k].cpu(), v) for k, v in before.items())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_snapshot_waits_for_every_gpu():
    state = {f"d{i}.{k}": v for i in range(2) for k, v in _state(f"cuda:{i}").items()}
    expected = {k: v.to("cpu", copy=True) for k, v in state.items()}
    with _mgr() as mgr:
        mgr.save(state, None, step=1, term=0)
        _bump(state)
        mgr.wait()
        loaded = mgr.latest()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in expected.items())
