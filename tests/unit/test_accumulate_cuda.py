"""CUDA paths: pinned, side-stream prefetch and fp16 + GradScaler on a GPU; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from elastictrain.accumulate import GradAccumulator, micro_batches, prefetch_to_device
from elastictrain.config import BatchConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_prefetch_copies_from_pinned_memory_on_a_side_stream():
    host = [{"x": torch.full((256, 64), float(i)), "n": i} for i in range(5)]
    order = []

    def source():
        for b in host:
            yield b

    out = []
    it = prefetch_to_device(source(), "cuda")
    for batch in it:
        assert batch["x"].device.type == "cuda"
        out.append((batch["x"] * 2).sum().item())  # compute on the current stream
        order.append(batch["n"])
    assert out == [float(i) * 2 * 256 * 64 for i in range(5)]
    assert order == list(range(5))
    assert type(it).__name__ == "_CudaPrefetcher"


def test_prefetch_hands_out_the_batch_before_a_source_error_and_takes_gpu_tensors():
    def source():
        yield {"x": torch.ones(4)}
        yield {"x": torch.full((4,), 2.0, device="cuda")}  # already on the GPU: not pinned, passed on
        raise OSError("shard unreadable")

    it = prefetch_to_device(source(), "cuda")
    assert next(it)["x"].sum().item() == 4.0
    assert next(it)["x"].sum().item() == 8.0  # copied before the source failed: not lost
    with pytest.raises(OSError, match="shard unreadable"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_micro_batches_to_cuda_match_host_order():
    data = [torch.tensor([float(i)]) for i in range(32)]
    cfg = BatchConfig(global_batch_size=8, micro_batch_size=3, seed=5)
    host = [b.tolist() for b in micro_batches(data, 2, rank=1, world_size=2, batch=cfg)]
    dev = list(micro_batches(data, 2, rank=1, world_size=2, batch=cfg, device="cuda"))
    assert all(b.is_cuda for b in dev)
    assert [b.cpu().tolist() for b in dev] == host


def test_fp16_scaler_on_cuda_matches_fp32_gradient_and_skips_inf():
    torch.manual_seed(0)
    ref_model = torch.nn.Linear(16, 4).cuda()
    model = torch.nn.Linear(16, 4).cuda()
    model.load_state_dict(ref_model.state_dict())
    x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 4, device="cuda")
    ((ref_model(x) - y) ** 2).sum().div(x.shape[0] * 4).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    acc = GradAccumulator(model, opt, scaler=scaler, autocast_dtype=torch.float16, max_grad_norm=100.0)
    with acc.step(4) as s:
        for xb, yb in zip(x.split(8), y.split(8)):
            out = model(xb)
            assert out.dtype == torch.float16
            s.backward(((out.float() - yb) ** 2).sum(), num_items=torch.tensor(yb.numel(), device="cuda"))
    assert not s.skipped and s.num_items == 128
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-2, atol=2e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with acc.step(1) as s:
        s.backward(((model(x).float() - y) ** 2).sum() * float("inf"), num_items=y.numel())
    assert s.skipped and scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_autocast_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, opt, autocast_dtype=torch.bfloat16)
    x = torch.randn(8, 16, device="cuda")
    with acc.step(2) as s:
        for xb in x.split(4):
            out = model(xb)
            assert out.dtype == torch.bfloat16
            s.backward(out.float().pow(2).sum(), num_items=xb.shape[0])
    assert not s.skipped and s.loss > 0
