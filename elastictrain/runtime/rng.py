"""The process's random number generators as a state tree of tensors and JSON scalars, and back.

A step lost in flight must draw the same numbers when it is run again, and a resumed run
must continue the sequence it stopped in: torch's CPU generator, CUDA's (once
initialised), numpy's global generator and Python's `random` are captured at each
commit, restored after a loss and stored in checkpoints. No pickle: the states are
integer tensors plus plain scalars.
"""

from __future__ import annotations

import random
from typing import Any

import torch


def seed_everything(seed: int) -> None:
    """Seed torch (and CUDA), numpy's global generator and `random` alike: a fresh worker's first entry."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def rng_state() -> dict:
    """The current states of torch, CUDA (when initialised), numpy and `random`."""
    return rng_state_of(capture_rng())


def capture_rng() -> tuple:
    """The current RNG states as the generators give them (no conversion): what a commit copies every
    step; `rng_state_of` turns it into `rng_state`'s form only when it is used."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        import numpy
    except ImportError:  # torch runs without numpy: then nothing can draw from it
        numpy_state = None
    else:
        numpy_state = numpy.random.get_state()
    return torch.get_rng_state(), cuda, numpy_state, random.getstate()


def rng_state_of(captured: tuple) -> dict:
    """`rng_state`'s form of what `capture_rng` captured."""
    torch_state, cuda, numpy_state, (version, internal, gauss) = captured
    state: dict[str, Any] = {"torch": torch_state}
    if cuda is not None:
        state["cuda"] = cuda
    if numpy_state is not None:
        state["numpy"] = _numpy_dict(numpy_state)
    state["random"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured; generators a tree lacks (an older checkpoint's) are left as they are.

    Raises:
        ValueError: an entry does not have the shape `rng_state` gives it.
    """
    torch.set_rng_state(_byte_tensor(state["torch"], "torch"))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"], "cuda"))
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "random" in state:
        _set_random_state(state["random"])


def _byte_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"the {name} RNG state must be a uint8 tensor, not {type(value).__name__}")
    return value.cpu()


def _numpy_dict(numpy_state: tuple) -> dict:
    import numpy

    kind, keys, pos, has_gauss, gauss = numpy_state
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(numpy.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: Any) -> None:
    import numpy

    try:
        kind, keys = state["kind"], state["keys"]
        if not isinstance(keys, torch.Tensor) or keys.shape != (624,) or keys.dtype != torch.int64:
            raise ValueError("keys must be 624 int64 values")
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), int(state["pos"]),
                                int(state["has_gauss"]), float(state["gauss"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the numpy RNG state in the restored state is malformed: {exc}") from None


def _set_random_state(state: Any) -> None:
    try:
        internal = state["state"]
        if not isinstance(internal, torch.Tensor) or internal.dim() != 1 or internal.dtype != torch.int64:
            raise ValueError("state must be a 1-d int64 tensor")
        gauss = state["gauss"]
        random.setstate((int(state["version"]), tuple(internal.tolist()), None if gauss is None else float(gauss)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the Python random state in the restored state is malformed: {exc}") from None
