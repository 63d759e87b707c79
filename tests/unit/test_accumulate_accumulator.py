"""GradAccumulator in one process: exact normalisation, AMP on CPU, clipping, fp32 accumulation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from elastictrain.accumulate import GradAccumulator


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 3, generator=g)
    # Very uneven item counts per micro-batch, so a mean of means is visibly wrong.
    mask = (torch.rand(n, 3, generator=g) < torch.linspace(0.1, 1.0, n)[:, None]).float()
    mask[0] = 1.0
    return x, y, mask


def _loss_sum(model, x, y, mask):
    return (((model(x) - y) ** 2) * mask).sum(), mask.sum()


def _micro(step, model, x, y, mask):
    loss, n = _loss_sum(model, x, y, mask)
    step.backward(loss, num_items=n)


def _reference_grads(model, x, y, mask):
    model.zero_grad()
    loss, n = _loss_sum(model, x, y, mask)
    (loss / n).backward()
    return [p.grad.clone() for p in model.parameters()], float(loss.detach() / n)


def _accumulate(model, opt, x, y, mask, sizes, k="auto", **kw):
    acc = GradAccumulator(model, opt, **kw)
    with acc.step(len(sizes) if k == "auto" else k) as s:
        for xb, yb, mb in zip(x.split(sizes), y.split(sizes), mask.split(sizes)):
            loss, n = _loss_sum(model, xb, yb, mb)
            s.backward(loss, num_items=n)
    return s


@pytest.mark.parametrize("sizes", [[12], [4, 4, 4], [5, 5, 2], [1] * 12])
@pytest.mark.parametrize("k", ["auto", None])
def test_gradient_equals_whole_batch_gradient(sizes, k):
    x, y, mask = _data()
    ref_model = _net()
    ref, ref_loss = _reference_grads(ref_model, x, y, mask)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    s = _accumulate(model, opt, x, y, mask, sizes, k=k)
    for g, r in zip((p.grad for p in model.parameters()), ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert s.loss == pytest.approx(ref_loss, rel=1e-6)
    assert s.num_items == int(mask.sum()) and isinstance(s.num_items, int)
    assert not s.skipped and s.micro_steps_done == len(sizes)


def test_mean_of_means_would_differ():
    # Guards the test above: with these masks the per-micro-batch mean really is different.
    x, y, mask = _data()
    model = _net()
    model.zero_grad()
    for xb, yb, mb in zip(x.split(4), y.split(4), mask.split(4)):
        loss, n = _loss_sum(model, xb, yb, mb)
        (loss / n / 3).backward()
    ref, _ = _reference_grads(_net(), x, y, mask)
    assert max((p.grad - r).abs().max().item() for p, r in zip(model.parameters(), ref)) > 1e-3


def test_optimizer_steps_once_and_grads_reset_each_step():
    x, y, mask = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _accumulate(model, opt, x, y, mask, [6, 6])
    ref, _ = _reference_grads(_net(), x, y, mask)
    for p, b, r in zip(model.parameters(), before, ref):
        torch.testing.assert_close(p.detach(), b - 0.1 * r, rtol=1e-5, atol=1e-6)
    acc = GradAccumulator(model, opt)
    with acc.step(1) as s:
        assert all(p.grad is None for p in model.parameters())  # zeroed with set_to_none
        _micro(s, model, x, y, mask)


def test_exception_in_block_propagates_and_skips_optimizer_step():
    x, y, mask = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    acc = GradAccumulator(model, opt)
    boom = RuntimeError("Connection reset by peer")
    with pytest.raises(RuntimeError) as info:
        with acc.step(2) as s:
            _micro(s, model, x, y, mask)
            raise boom
    assert info.value is boom
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert s.loss is None
    with acc.step(1) as s2:  # the accumulator is usable again
        _micro(s2, model, x, y, mask)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_wrong_number_of_micro_steps_is_an_error():
    x, y, mask = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, opt)
    with pytest.raises(RuntimeError, match="more than num_micro_batches=1"):
        with acc.step(1) as s:
            _micro(s, model, x, y, mask)
            _micro(s, model, x, y, mask)
    with pytest.raises(RuntimeError, match="ran 1 backward"):
        with acc.step(2) as s:
            _micro(s, model, x, y, mask)
    with pytest.raises(RuntimeError, match="inside"):
        _micro(s, model, x, y, mask)


@pytest.mark.parametrize("sizes", [[12], [6, 6]])
def test_zero_items_skips_the_step(sizes):
    x, y, mask = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    s = _accumulate(model, opt, x, y, torch.zeros_like(mask), sizes)
    assert s.skipped and math.isnan(s.loss) and s.num_items == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_clipping_applies_to_the_normalised_gradient():
    x, y, mask = _data()
    ref, _ = _reference_grads(_net(), x, y, mask)
    ref_norm = torch.linalg.vector_norm(torch.cat([r.flatten() for r in ref])).item()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    s = _accumulate(model, opt, x, y, mask, [4, 8], max_grad_norm=ref_norm / 4)
    assert s.grad_norm == pytest.approx(ref_norm, rel=1e-5)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r / 4, rtol=1e-4, atol=1e-6)
    s = _accumulate(_net(), opt, x, y, mask, [4, 8], max_grad_norm=ref_norm * 2)
    assert s.grad_norm == pytest.approx(ref_norm, rel=1e-5)


def test_bf16_autocast_on_cpu():
    x, y, mask = _data()
    ref, ref_loss = _reference_grads(_net(), x, y, mask)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = GradAccumulator(model, opt, autocast_dtype=torch.bfloat16)
    dtypes = []
    with acc.step(2) as s:
        for xb, yb, mb in zip(x.split(6), y.split(6), mask.split(6)):
            out = model(xb)
            dtypes.append(out.dtype)
            s.backward((((out.float() - yb) ** 2) * mb).sum(), num_items=mb.sum())
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert not torch.is_autocast_enabled("cpu")
    for p, r in zip(model.parameters(), ref):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, r, rtol=5e-2, atol=2e-2)
    assert s.loss == pytest.approx(ref_loss, rel=5e-2)


def test_fp16_scaler_on_cpu_skips_inf_step_and_backs_off():
    x, y, mask = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = GradAccumulator(model, opt, scaler=scaler, autocast_dtype=torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    with acc.step(2) as s:
        for i, (xb, yb, mb) in enumerate(zip(x.split(6), y.split(6), mask.split(6))):
            loss = (((model(xb).float() - yb) ** 2) * mb).sum()
            s.backward(loss * (math.inf if i == 1 else 1.0), num_items=mb.sum())
    assert s.skipped and scaler.get_scale() == 512.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    ref, _ = _reference_grads(_net(), x, y, mask)
    with acc.step(2) as s:
        for xb, yb, mb in zip(x.split(6), y.split(6), mask.split(6)):
            s.backward((((model(xb).float() - yb) ** 2) * mb).sum(), num_items=mb.sum())
    assert not s.skipped
    for p, r in zip(model.parameters(), ref):  # unscaled and normalised before the step
        torch.testing.assert_close(p.grad, r, rtol=2e-2, atol=5e-3)


def test_fp32_grad_accum_for_bf16_params():
    x, y, mask = _data(n=64, seed=3)
    ref, _ = _reference_grads(_net(torch.float32), x, y, mask)
    model = _net(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = GradAccumulator(model, opt, fp32_grad_accum=True)
    with acc.step(16) as s:
        for xb, yb, mb in zip(x.split(4), y.split(4), mask.split(4)):
            out = model(xb.bfloat16()).float()
            s.backward((((out - yb) ** 2) * mb).sum(), num_items=mb.sum())
    assert all(b.dtype == torch.float32 for b in acc._fp32_bufs)
    for p, r in zip(model.parameters(), ref):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), r, rtol=5e-2, atol=1e-2)


def test_constructor_rejects_bad_settings():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradAccumulator(model, opt, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        GradAccumulator(model, opt, autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="drop the scaler"):
        GradAccumulator(model, opt, scaler=torch.amp.GradScaler("cpu"), fp32_grad_accum=True)
    with pytest.raises(ValueError, match="num_micro_batches=0"):
        GradAccumulator(model, opt).step(0)


def test_extra_vector_comes_back_after_the_step_in_one_process():
    from elastictrain.accumulate import GradAccumulator

    model = torch.nn.Linear(3, 1)
    acc = GradAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with acc.step(num_micro_batches=2, extra=torch.tensor([0.0, 1.0, 0.0])) as s:
        for _ in range(2):
            s.backward(model(torch.ones(2, 3)).sum(), num_items=2)
    assert s.extra.tolist() == [0.0, 1.0, 0.0] and s.num_items == 4
    with acc.step(num_micro_batches=1) as plain:
        plain.backward(model(torch.ones(1, 3)).sum(), num_items=1)
    assert plain.extra is None


def test_bad_item_counts_are_refused_and_nothing_is_applied():
    for bad in (math.nan, math.inf, -1):
        model = torch.nn.Linear(3, 1)
        before = [p.detach().clone() for p in model.parameters()]
        acc = GradAccumulator(model, torch.optim.SGD(model.parameters(), lr=1.0))
        with pytest.raises(ValueError, match="finite count"):
            with acc.step(1) as s:
                s.backward(model(torch.ones(2, 3)).sum(), num_items=bad)
        with pytest.raises(ValueError, match="on every rank"):  # a tensor count is checked without a sync
            with acc.step(1) as s:
                s.backward(model(torch.ones(2, 3)).sum(), num_items=torch.tensor(float(bad)))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        with acc.step(1) as s:  # and the accumulator is usable again
            s.backward(model(torch.ones(2, 3)).sum(), num_items=2)
        assert not s.skipped


def test_clipping_fp16_parameters_measures_the_norm_in_fp32():
    p = torch.nn.Parameter(torch.zeros(10000, dtype=torch.float16))
    acc = GradAccumulator(torch.nn.ParameterList([p]), torch.optim.SGD([p], lr=1.0), max_grad_norm=1000.0)
    with acc.step(1) as s:  # 1000 items, each with gradient 1 everywhere: the summed fp16 norm overflows
        s.backward((p * torch.ones_like(p)).sum() * 1000, num_items=1000)
    assert s.grad_norm == pytest.approx(100.0, rel=1e-4)
    assert torch.all(p == -1.0)  # not clipped to nothing


def test_unused_parameter_keeps_no_gradient_with_fp32_accumulation():
    used, unused = (torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)) for _ in range(2))
    opt = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5)
    acc = GradAccumulator(torch.nn.ParameterList([used, unused]), opt, fp32_grad_accum=True)
    with acc.step(1) as s:
        s.backward(used.float().sum(), num_items=1)
    assert unused.grad is None and torch.equal(unused, torch.ones(4, dtype=torch.bfloat16))
    assert used.grad is not None


def test_a_step_that_fails_to_open_does_not_stay_open():
    model = torch.nn.Linear(2, 1)
    acc = GradAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), process_group=object())
    for _ in range(2):  # the same clear error each time, not "a step is still open"
        with pytest.raises(RuntimeError, match="not initialised"):
            with acc.step(1):
                pass


def _two_rank_run(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    try:
        torch.save(_side_branch_run(rank, 2), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """End a spawned rank whose results are on disk without interpreter teardown.

    A gloo worker thread can still be dropping its last reference to a collective's tensor
    when the interpreter finalizes; taking the GIL then ends the thread mid-unwind and the
    process aborts (SIGABRT, "terminate called without an active exception"; seen about once
    in 15 runs here).
    """
    import os

    os._exit(0)


def _side_branch_run(rank: int, world: int) -> dict:
    """AdamW with weight decay on a model whose `side` layer only step 0 uses (float64, 3 steps)."""
    from elastictrain.accumulate import plan_rank

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    torch.manual_seed(1)
    main, side = torch.nn.Linear(4, 1).double(), torch.nn.Linear(4, 1).double()
    model = torch.nn.ModuleDict({"main": main, "side": side})
    acc = GradAccumulator(model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), max_grad_norm=100.0)
    plan = plan_rank(6, 2, world, rank)
    norms = []
    for step in range(3):
        with acc.step(plan.num_micro_batches) as s:
            for b, e in plan.micro_ranges():
                pred = main(x[b:e]) + (side(x[b:e]) if step == 0 else 0)
                s.backward((((pred - y[b:e]) ** 2).squeeze(1) * weights[b:e]).sum(), num_items=weights[b:e].sum())
        norms.append(s.grad_norm)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "norms": norms}


def test_two_gloo_ranks_match_one_process_with_a_parameter_unused_in_later_steps(tmp_path):
    import torch.multiprocessing as mp

    reference = _side_branch_run(0, 1)
    out = str(tmp_path / "out")
    mp.spawn(_two_rank_run, args=(str(tmp_path / "store"), out), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        for name, value in reference["state"].items():
            assert torch.allclose(got["state"][name], value, rtol=0, atol=1e-12), name
        assert got["norms"] == pytest.approx(reference["norms"], rel=1e-12)


def _sparse_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    try:
        emb = torch.nn.Embedding(10, 3, sparse=True)
        acc = GradAccumulator(emb, torch.optim.SparseAdam(emb.parameters()))
        try:
            with acc.step(1) as s:
                s.backward(emb(torch.tensor([1, 2])).sum(), num_items=2)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        torch.save(message, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_sparse_gradients_without_ddp_get_a_clear_error_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    mp.spawn(_sparse_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    for rank in (0, 1):
        assert "sparse gradient" in torch.load(f"{out}.{rank}")


def test_a_compiled_ddp_model_is_reduced_by_ddp_alone(tmp_path):
    """torch.compile(DDP(m)) hides DDP's no_sync: the accumulator must still find it, or it would
    all-reduce the gradients a second time on top of DDP's own reduction."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = torch.compile(DDP(torch.nn.Linear(4, 1)), backend="eager")
        acc = GradAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert acc._ddp and acc._ddp_module is model._orig_mod
        assert acc._reduce_mode(2, 1) == "ddp"
        with acc.step(2) as s:
            for x in torch.ones(2, 3, 4):
                s.backward(model(x).sum(), num_items=3)
        assert s.num_items == 6
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("factor,max_norm", [(0.25, 0.5), (0.25, 100.0), (1.0, 1.0)])
def test_clip_and_scale_equals_scaling_then_torchs_clip(factor, max_norm):
    from elastictrain.accumulate.accumulator import clip_and_scale

    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, generator=g) * 4, torch.randn(7, generator=g)]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x * factor
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = clip_and_scale(grads, max_norm, factor)
    assert torch.allclose(norm, expected_norm)
    for p, x in zip(params, grads):
        assert torch.allclose(x, p.grad, atol=1e-6)
