"""Watch what a process allocates through `torch.empty` (the state transfer allocates through it)."""

from __future__ import annotations

from typing import Callable

import torch


def spy_on_empty(note: Callable[[tuple, object, int], None]) -> Callable:
    """Replace `torch.empty` with one that calls `note(dims, dtype, nbytes)` before allocating (it may raise
    to refuse); returns the real `torch.empty`, for the caller to put back."""
    real = torch.empty

    def empty(*shape, dtype=None, **kwargs):
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        nbytes = (dtype or torch.float32).itemsize
        for d in dims:
            nbytes *= d
        note(dims, dtype, nbytes)
        return real(*shape, dtype=dtype, **kwargs)

    torch.empty = empty
    return real
