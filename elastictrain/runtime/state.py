"""The elastic state: what `ctx.state(...)` registers, restores and hands to new members.

Tensors are never copied per step. A survivor keeps the objects of its last entry;
on re-entry their state is loaded into the new objects once. Members behind the
newest one (or new) receive rank 0's state by broadcast. What is copied at each
commit is small: the plain entries' containers and the RNG states, so a step lost
in flight does not leave its counters or random draws behind.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from elastictrain.statetree import flatten_state, unflatten_state

_RESERVED = {"step"}


def _unwrap(obj: Any) -> Any:
    return getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def copy_plain(value: Any) -> Any:
    """Copy the containers (dict, list, tuple, set) of a plain value; keep what they hold by reference."""
    if isinstance(value, dict):
        return {k: copy_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(copy_plain(v) for v in value)
    if isinstance(value, set):
        return set(value)
    return value


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class ElasticState:
    """Named training objects plus the committed step.

    Objects with `state_dict`/`load_state_dict` (models, optimizers, schedulers)
    are saved through those; other values (ints, floats, tensors, dicts) are
    attributes that the loop may reassign (`state.tokens_seen += n`).
    """

    def __init__(self, objects: dict[str, Any]) -> None:
        bad = _RESERVED & set(objects)
        if bad:
            raise ValueError(f"ctx.state(): {sorted(bad)} is reserved; pick another name")
        object.__setattr__(self, "_objects", dict(objects))
        object.__setattr__(self, "step", 0)

    def __getattr__(self, name: str) -> Any:
        objects = object.__getattribute__(self, "_objects")
        if name in objects:
            return objects[name]
        raise AttributeError(f"state has no entry {name!r}; entries: {sorted(objects)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "step":
            object.__setattr__(self, "step", int(value))
        elif name in self._objects and _is_stateful(self._objects[name]):
            raise AttributeError(f"state entry {name!r} is a stateful object; mutate it, don't replace it")
        else:
            self._objects[name] = value

    def plain(self) -> dict[str, Any]:
        """The plain (not stateful) entries, copied so later reassignments and list/dict edits do not
        reach the copy; tensors and other objects inside are shared, not copied."""
        return {n: copy_plain(v) for n, v in self._objects.items() if not _is_stateful(_unwrap(v))}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in self._objects.values() if isinstance(o, torch.optim.Optimizer)]

    def release_world(self) -> None:
        """Drop DDP wrappers (they hold the old process group), keeping the modules and their state."""
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                self._objects[name] = obj.module

    def tree(self, *, with_rng: bool = True) -> dict:
        """The whole state as a tree of tensors and plain values (no copies)."""
        objects = {}
        for name, obj in self._objects.items():
            obj = _unwrap(obj)
            objects[name] = obj.state_dict() if _is_stateful(obj) else obj
        tree = {"step": self.step, "objects": objects}
        if with_rng:
            tree["rng"] = rng_state()
        return tree

    def load_tree(self, tree: dict) -> None:
        """Load a tree made by `tree()` into these objects."""
        objects = tree["objects"]
        missing = set(self._objects) - set(objects)
        if missing:
            raise KeyError(f"restored state lacks entries {sorted(missing)} that ctx.state() registered")
        for name, obj in self._objects.items():
            target = _unwrap(obj)
            if _is_stateful(target):
                target.load_state_dict(objects[name])
            else:
                self._objects[name] = objects[name]
        self.step = int(tree["step"])
        if "rng" in tree:
            set_rng_state(tree["rng"])

    def flatten(self) -> tuple[dict[str, torch.Tensor], Any]:
        """Named tensors and skeleton, for checkpoints."""
        return flatten_state(self.tree())


def broadcast_tree(tree: Optional[dict], *, src: int, device: torch.device) -> dict:
    """Send rank `src`'s state tree to every rank of the current group; returns the tree.

    Tensors travel one by one on `device` (CUDA for NCCL, CPU for gloo) and land
    where the source kept them (a CPU optimizer step count stays on the CPU).
    """
    rank = dist.get_rank()
    if rank == src:
        if tree is None:
            raise ValueError("the broadcast source has no state")
        tensors, skeleton = flatten_state(tree)
        layout = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.device.type) for n, t in tensors.items()]
        header: list[Any] = [skeleton, layout]
    else:
        tensors, header = {}, [None, None]
    dist.broadcast_object_list(header, src=src)
    skeleton, layout = header
    received: dict[str, torch.Tensor] = {}
    for name, shape, dtype, home in layout:
        if rank == src:
            buf = tensors[name].detach().to(device).contiguous()
        else:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(buf, src=src)
        received[name] = buf if home == device.type else buf.to(home)
    return tree if rank == src else unflatten_state(received, skeleton)
