"""GradAccumulator: the micro-steps of one optimizer step, with exact global loss normalisation.

The gradient of a step is ``sum(grad(loss_sum)) / N``, N the item count summed
over every micro-batch of every rank (not a mean of per-batch means). Losses are
backpropagated unscaled; once N is known, one multiply of the gradients turns
the sum (or DDP's average over ranks) into that quotient.

Every collective of a step happens before ``optimizer.step()`` and none after
it, so a survivor's live state is its last committed step. If a collective
raises (a peer died), the optimizer does not step and the error propagates
unchanged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from elastictrain.accumulate.collectives import (
    agree_found_inf,
    all_reduce_grads,
    collective_device,
    world_size_of,
)

Number = Union[int, float]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AccumulationStep:
    """One optimizer step in progress; made by ``GradAccumulator.step`` and used as a context manager.

    After the ``with`` block: ``loss`` (global mean loss, python float), ``num_items``
    (global item count), ``skipped`` (True when the optimizer did not step: inf/nan
    under a GradScaler, or no item in the whole step), ``grad_norm`` (total norm of
    the normalised gradient before clipping, when ``max_grad_norm`` is set).
    """

    def __init__(self, acc: "GradAccumulator", num_micro_batches: Optional[int], extra: Optional[torch.Tensor] = None):
        if num_micro_batches is not None and num_micro_batches < 1:
            raise ValueError(f"num_micro_batches={num_micro_batches} must be at least 1 (or None if unknown)")
        self._acc = acc
        self.num_micro_batches = num_micro_batches
        self.micro_steps_done = 0
        self.loss: Optional[float] = None
        self.num_items: Optional[Number] = None
        self.skipped = False
        self._grad_norm: Optional[torch.Tensor] = None
        self._open = False
        self._finished = False
        self._autocast = contextlib.ExitStack()
        self._no_sync = contextlib.ExitStack()
        self._loss_local: Optional[torch.Tensor] = None
        self._items_local: Union[Number, torch.Tensor] = 0
        self._stats: Optional[torch.Tensor] = None
        self._stats_work: Any = None
        self._extra_local = None if extra is None else extra.detach().reshape(-1).to(torch.float64)
        self.extra: Optional[torch.Tensor] = None
        self._used: set[int] = set()  # fp32-accumulated parameters (indices) that got a gradient

    @property
    def grad_norm(self) -> Optional[float]:
        """Total 2-norm of the step's normalised gradient before clipping; None without ``max_grad_norm``."""
        return None if self._grad_norm is None else float(self._grad_norm)

    # --- context ----------------------------------------------------------

    def __enter__(self) -> "AccumulationStep":
        if self._open or self._finished:
            raise RuntimeError("an AccumulationStep is entered once; call acc.step() for the next step")
        acc = self._acc
        acc._begin_step(self)
        try:
            self._world = acc._world_size()
            self._mode = acc._reduce_mode(self.num_micro_batches, self._world)
            if acc.autocast_dtype is not None:
                self._autocast.enter_context(torch.autocast(acc._device_type(), dtype=acc.autocast_dtype))
            # DDP's own all-reduce runs in the last backward only; every earlier forward
            # and backward stays inside no_sync so the reducer sees nothing to reduce.
            if self._mode == "manual" or (self._mode == "ddp" and self.num_micro_batches > 1):
                if acc._ddp:
                    self._no_sync.enter_context(acc._ddp_module.no_sync())
        except BaseException:
            self._no_sync.close()
            self._autocast.close()
            acc._end_step(self)
            raise
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._no_sync.close()
        self._autocast.close()
        self._open = False
        self._acc._end_step(self)
        if exc_type is not None:
            # The in-flight step is lost: no optimizer step, the exception goes on as it is.
            self._stats_work = None
            self._finished = True
            return False
        self._finished = True
        self._finish()
        return False

    # --- micro-steps ------------------------------------------------------

    def backward(self, loss_sum: torch.Tensor, *, num_items: Union[Number, torch.Tensor]) -> None:
        """Backpropagate one micro-batch's summed loss.

        Args:
            loss_sum: The loss summed (not averaged) over the micro-batch's items; a scalar tensor.
            num_items: How many items ``loss_sum`` sums over (e.g. unmasked tokens); a number
                or a scalar tensor (kept on its device, no host sync).

        Raises:
            RuntimeError: called outside the ``with`` block, or more often than ``num_micro_batches``.
        """
        if not self._open:
            raise RuntimeError("backward() is called inside `with acc.step(...) as s:` only")
        k = self.num_micro_batches
        if k is not None and self.micro_steps_done >= k:
            raise RuntimeError(
                f"backward() called more than num_micro_batches={k} times in one step: "
                "pass the rank's plan_rank(...).num_micro_batches"
            )
        if not isinstance(num_items, torch.Tensor) and not (math.isfinite(num_items) and num_items >= 0):
            raise ValueError(f"num_items={num_items!r} must be a finite count >= 0")
        self.micro_steps_done += 1
        detached = loss_sum.detach().to(torch.float64)
        self._loss_local = detached if self._loss_local is None else self._loss_local + detached
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.detach().to(torch.float64)
        self._items_local = self._items_local + num_items
        last = k is not None and self.micro_steps_done == k
        if last and self._world > 1:
            # Every item is known before the last backward: reduce the counts now, in the
            # background, so the tiny all-reduce overlaps the backward. Waiting for it
            # here (to normalise the loss itself) would add a second point per step
            # where ranks wait for each other, which costs more than the one multiply
            # of the gradients it would save.
            self._launch_stats(async_op=True)
        acc = self._acc
        loss = loss_sum if acc.scaler is None else acc.scaler.scale(loss_sum)
        with torch.autocast(acc._device_type(), enabled=False) if acc.autocast_dtype is not None else contextlib.nullcontext():
            loss.backward()
        if acc._fp32_params:  # their gradients leave p.grad each micro-step: note which ones had one
            self._used.update(acc._move_grads_to_fp32())
        if self._mode == "ddp" and self.micro_steps_done == k - 1:
            self._no_sync.close()

    # --- end of step ------------------------------------------------------

    def _launch_stats(self, async_op: bool) -> None:
        device = collective_device(self._acc._group(), self._acc._param_device())
        items = self._items_local
        parts = [self._loss_local.reshape(1).to(device)]
        if isinstance(items, torch.Tensor):
            items_t = items.to(device=device, dtype=torch.float64).reshape(1)
            bad = (~torch.isfinite(items_t) | (items_t < 0)).to(torch.float64)  # checked after the reduce: no host sync
            parts += [items_t, bad]
        else:  # a number, checked by backward() already: one small tensor for the count and a bad-count of 0
            parts.append(torch.tensor([float(items), 0.0], dtype=torch.float64, device=device))
        if self._extra_local is not None:
            parts.append(self._extra_local.to(device))
        self._stats = torch.cat(parts)
        if self._world > 1:
            self._stats_work = dist.all_reduce(self._stats, group=self._acc._group(), async_op=async_op)

    def _finish(self) -> None:
        """Close the step: agree on the global item count, normalise (and clip) the gradients, step."""
        self._check_micro_steps()
        items_total = self._settle_stats()
        if items_total <= 0:  # every rank sees the same total, so every rank skips
            self.loss, self.skipped = math.nan, True
            return
        used, factor = self._reduce_grads(items_total)
        acc = self._acc
        found_inf = False
        if acc.scaler is not None:
            acc.scaler.unscale_(acc.optimizer)
            found_inf = agree_found_inf(acc.scaler, acc.optimizer, acc._group(), self._world, acc._param_device())
        grads = acc._grads_to_step(used)
        if acc.max_grad_norm is not None and grads:
            self._grad_norm = clip_and_scale(grads, acc.max_grad_norm, factor)
        elif factor != 1.0 and grads:
            torch._foreach_mul_(grads, factor)
        acc._write_back_fp32_grads(used)
        if acc.scaler is not None:
            acc.scaler.step(acc.optimizer)
            acc.scaler.update()
            self.skipped = found_inf
        else:
            acc.optimizer.step()

    def _check_micro_steps(self) -> None:
        k = self.num_micro_batches
        if self.micro_steps_done == 0 or (k is not None and self.micro_steps_done != k):
            raise RuntimeError(
                f"the step ran {self.micro_steps_done} backward() calls but num_micro_batches={k}: "
                "pass the rank's plan_rank(...).num_micro_batches, or None when unknown"
            )

    def _settle_stats(self) -> float:
        """Finish the all-reduce of (loss, items, bad counts, extra); set `loss`, `num_items`, `extra`;
        returns the global item count. Raises when a rank passed an item count that is not a count."""
        if self._stats is None:
            self._launch_stats(async_op=False)
        elif self._stats_work is not None:
            try:
                self._stats_work.wait()
            except RuntimeError as exc:  # torch raises a lost peer here as a plain RuntimeError: say what it is
                raise dist.DistNetworkError(f"all-reduce of the step's item count failed: {exc}") from exc
        self._stats_work = None
        stats = self._stats.tolist()
        loss_total, items_total, bad = stats[0], stats[1], stats[2]
        if self._extra_local is not None:
            self.extra = torch.tensor(stats[3:], dtype=torch.float64)
        if bad > 0 or not math.isfinite(items_total):
            raise ValueError(
                f"num_items must be a finite count >= 0 on every rank; {int(bad)} rank(s) passed one that is "
                "negative, inf or nan: the step is not applied"
            )
        self.num_items = int(items_total) if float(items_total).is_integer() else items_total
        if items_total > 0:
            self.loss = loss_total / items_total
        return items_total

    def _reduce_grads(self, items_total: float) -> tuple[Optional[set], float]:
        """Sum the gradients over ranks where the accumulator does it (DDP did already); returns the
        parameters with a gradient (None: DDP tracks them) and the factor still to apply."""
        acc = self._acc
        # which parameters got a gradient (the others keep None, as in one process); DDP tracks its own
        used = None if self._mode == "ddp" else self._used | acc._with_grads()
        if self._mode == "manual" and self._world > 1:
            # Normalise before the sum (fp16 gradients would overflow summed first); the parameters
            # used anywhere ride along as flags, so unused ones keep None on every rank.
            grads, flags = acc._grads_for_reduce(used)
            torch._foreach_mul_(grads, 1.0 / items_total)
            all_reduce_grads(grads + [flags], acc._group())
            used = {i for i, f in enumerate(flags.tolist()) if f > 0}
            acc._drop_unused_grads(used)
            return used, 1.0
        return used, (self._world if self._mode == "ddp" else 1) / items_total  # DDP averages over ranks


def clip_and_scale(grads: list[torch.Tensor], max_norm: float, factor: float) -> torch.Tensor:
    """Scale `grads` by `factor` and clip their total norm (after scaling) to `max_norm`, in place, in
    one pass; returns the total norm after scaling, before clipping. Per-tensor norms are taken in
    fp32: an fp16 norm of a summed gradient overflows to inf."""
    low = [g for g in grads if g.dtype in _LOW_PRECISION]
    rest = [g for g in grads if g.dtype not in _LOW_PRECISION]
    norms = (list(torch._foreach_norm(low, 2, dtype=torch.float32)) if low else []) + (
        list(torch._foreach_norm(rest, 2)) if rest else [])
    norm = torch.nn.utils.get_total_norm(norms, 2.0) * factor
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0) * factor
    torch._foreach_mul_(grads, coef)
    return norm


class GradAccumulator:
    """Runs k micro-batches per optimizer step with one gradient all-reduce and an exact global mean.

    Usable without the trainer: with a DDP-wrapped model, a plain module in one
    process, or a plain module in an initialised process group (its gradients are
    then all-reduced by the accumulator in one coalesced call).

    Example:
        >>> acc = GradAccumulator(model, opt)
        >>> with acc.step(num_micro_batches=len(batches)) as s:
        ...     for x, y, mask in batches:
        ...         loss_sum, n = masked_loss_sum(model(x), y, mask), mask.sum()
        ...         s.backward(loss_sum, num_items=n)
        >>> s.loss, s.num_items, s.skipped
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        process_group: Optional[Any] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        fp32_grad_accum: bool = False,
    ):
        """Wrap a model and its optimizer.

        Args:
            model: A ``DistributedDataParallel`` module (its ``no_sync`` is used) or a plain module.
            optimizer: Steps once per ``acc.step()`` block, after every collective of the step.
            process_group: Group to reduce over; default: the DDP module's group, else the
                default group if one is initialised, else none (a single process).
            scaler: A ``torch.amp.GradScaler`` for fp16; a step with inf/nan is skipped on every rank.
            autocast_dtype: Runs the block under ``torch.autocast`` with this dtype (float16
                or bfloat16); backward runs outside autocast.
            max_grad_norm: Clip the normalised gradient's total 2-norm to this, after unscaling.
            fp32_grad_accum: Accumulate gradients of fp16/bf16 parameters in fp32 buffers and
                all-reduce them in fp32 (one coalesced call instead of DDP's buckets).

        Raises:
            ValueError: ``max_grad_norm`` not positive, an unsupported autocast dtype, or a
                scaler together with ``fp32_grad_accum``.
        """
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be positive (or None for no clipping)")
        if autocast_dtype is not None and autocast_dtype not in _LOW_PRECISION:
            raise ValueError(f"autocast_dtype={autocast_dtype} must be torch.float16, torch.bfloat16 or None")
        if scaler is not None and fp32_grad_accum:
            raise ValueError(
                "fp32_grad_accum is for bf16/fp16 parameters without a GradScaler: drop the scaler "
                "(bf16 needs none) or set fp32_grad_accum=False"
            )
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.max_grad_norm = max_grad_norm
        self.fp32_grad_accum = fp32_grad_accum
        self._process_group = process_group
        self._ddp_module = _ddp_inside(model)
        self._ddp = self._ddp_module is not None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._fp32_params = [p for p in self._params if fp32_grad_accum and p.dtype in _LOW_PRECISION]
        self._fp32_bufs: list[torch.Tensor] = []
        self._active: Optional[AccumulationStep] = None

    def step(self, num_micro_batches: Optional[int] = None, *, extra: Optional[torch.Tensor] = None) -> AccumulationStep:
        """Open one optimizer step of ``num_micro_batches`` micro-steps.

        Args:
            num_micro_batches: k, the number of ``backward`` calls this rank makes in the
                step (``plan_rank(...).num_micro_batches`` or ``len(micro_batches(...))``);
                it may differ between ranks. None when unknown: every micro-step then runs
                without synchronisation and the gradients are all-reduced once at the end
                in one coalesced call (same math, no overlap of communication with the
                last backward). Every rank must pass an int, or every rank None.
            extra: a small vector summed over ranks in the same all-reduce as the item
                count (no extra collective); the sum is ``s.extra`` after the block. The
                elastic runtime sends its step-boundary vote this way.

        Returns:
            The step, to use as ``with acc.step(k) as s: ... s.backward(loss_sum, num_items=n)``.
        """
        return AccumulationStep(self, num_micro_batches, extra)

    # --- helpers used by AccumulationStep ---------------------------------

    def _group(self) -> Any:
        if self._process_group is not None:
            return self._process_group
        if self._ddp:
            return self._ddp_module.process_group
        return None

    def _world_size(self) -> int:
        return world_size_of(self._group(), explicit=self._process_group is not None or self._ddp)

    def _reduce_mode(self, k: Optional[int], world: int) -> str:
        if self._ddp and k is not None and not self._fp32_params:
            return "ddp"
        if self._ddp or world > 1:
            return "manual"
        return "local"

    def _param_device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _device_type(self) -> str:
        return self._param_device().type

    def _begin_step(self, step: AccumulationStep) -> None:
        if self._active is not None:
            raise RuntimeError("a step of this GradAccumulator is still open: finish it before the next")
        self._active = step
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        if self._fp32_params:
            if not self._fp32_bufs:
                self._fp32_bufs = [torch.zeros_like(p, dtype=torch.float32) for p in self._fp32_params]
            else:
                torch._foreach_zero_(self._fp32_bufs)

    def _end_step(self, step: AccumulationStep) -> None:
        if self._active is step:
            self._active = None

    def _move_grads_to_fp32(self) -> list[int]:
        """Add the fp32-accumulated parameters' gradients to their buffers; returns the indices of those moved."""
        pairs = [(b, p.grad) for b, p in zip(self._fp32_bufs, self._fp32_params) if p.grad is not None]
        moved = [self._index[id(p)] for p in self._fp32_params if p.grad is not None]
        if pairs:
            torch._foreach_add_([b for b, _ in pairs], [g.to(torch.float32) for _, g in pairs])
        for p in self._fp32_params:
            p.grad = None
        return moved

    def _with_grads(self) -> set[int]:
        return {i for i, p in enumerate(self._params) if p.grad is not None}

    def _grads_for_reduce(self, used: set[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The gradients to all-reduce, and a flag per parameter: 1 where this rank gave it a gradient.

        Every rank must reduce the same tensors in the same order: a gradient that is None here (a
        parameter this rank did not use) becomes zeros until the flags say whether any rank used it.
        """
        fp32 = {id(p) for p in self._fp32_params}
        out = []
        for p in self._params:
            if id(p) in fp32:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.layout != torch.strided:
                raise ValueError(
                    "a parameter has a sparse gradient (say, nn.Embedding(sparse=True)), which GradAccumulator "
                    "cannot all-reduce without DDP: wrap the model in DistributedDataParallel, or use a dense embedding"
                )
            out.append(p.grad)
        flags = torch.zeros(len(self._params), dtype=torch.float32, device=self._param_device())
        if used:
            flags[sorted(used)] = 1.0
        return out + list(self._fp32_bufs), flags

    def _drop_unused_grads(self, used: set[int]) -> None:
        for i, p in enumerate(self._params):
            if i not in used:
                p.grad = None

    def _grads_to_step(self, used: Optional[set[int]]) -> list[torch.Tensor]:
        fp32 = {id(p) for p in self._fp32_params}
        grads = [p.grad for p in self._params if id(p) not in fp32 and p.grad is not None]
        return grads + [b for b, p in zip(self._fp32_bufs, self._fp32_params) if self._is_used(p, used)]

    def _is_used(self, p: torch.Tensor, used: Optional[set[int]]) -> bool:
        return used is None or self._index[id(p)] in used

    def _write_back_fp32_grads(self, used: Optional[set[int]]) -> None:
        for p, buf in zip(self._fp32_params, self._fp32_bufs):
            p.grad = buf.to(p.dtype) if self._is_used(p, used) else None


def _ddp_inside(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP module `model` is, or wraps through `torch.compile` (whose module hides DDP's `no_sync`)."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model
