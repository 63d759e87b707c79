"""The few collectives the accumulator issues itself, all before the optimizer step.

Kept apart from the step logic so their order (and count) per step is easy to audit:
the item-count/loss all-reduce, the coalesced gradient all-reduce when DDP does not
reduce, and, with a GradScaler, the agreement on inf/nan.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# Large enough that a small model goes in one call, small enough that the flat
# copy of a large model does not double its gradient memory at once.
_BUCKET_ELEMENTS = 64 * 1024 * 1024


def world_size_of(group: Any, *, explicit: bool) -> int:
    """Ranks in ``group``; 1 when no group was given and none is initialised (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        if explicit:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1
    return dist.get_world_size(group)


def collective_device(group: Any, param_device: torch.device) -> torch.device:
    """Where a small tensor must live to be reduced over ``group``: host for gloo, the GPU otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return param_device
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return param_device


def all_reduce_grads(grads: list[torch.Tensor], group: Any) -> None:
    """Sum ``grads`` over ``group`` in as few calls as possible (one per dtype and bucket), in place."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for tensors in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if bucket and size + t.numel() > _BUCKET_ELEMENTS:
                _reduce_bucket(bucket, group)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            _reduce_bucket(bucket, group)


def _reduce_bucket(bucket: list[torch.Tensor], group: Any) -> None:
    flat = _flatten_dense_tensors(bucket)
    dist.all_reduce(flat, group=group)
    for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
        t.copy_(reduced)


def agree_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, group: Any, world: int,
    param_device: torch.device = torch.device("cpu"),
) -> bool:
    """Make the GradScaler's inf/nan verdict the same on every rank; True when the step is skipped.

    All-reduced gradients give every rank the same verdict already; this reduce makes
    sure of it, so a rank cannot step while another skips.
    """
    # GradScaler keeps the verdict of unscale_() per optimizer and device; step() reads it.
    state = scaler._per_optimizer_states[id(optimizer)]
    per_device = state["found_inf_per_device"]
    local = sum(float(v.item()) for v in per_device.values())
    if world <= 1:
        return local > 0
    # a rank with no gradient at all has no verdict tensor: the flag then lives where the parameters do (NCCL)
    device = next(iter(per_device.values())).device if per_device else param_device
    flag = torch.tensor([local], dtype=torch.float32, device=collective_device(group, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    agreed = float(flag.item())
    if agreed > 0 and local == 0:
        for v in per_device.values():
            v.fill_(1.0)
    return agreed > 0
