"""What a commit copies so a step lost in flight leaves nothing behind, without copying parameters.

Parameters and optimizer moments change only in the optimizer step, which runs after the
step's last collective, so a survivor's live ones are the committed step's. Everything
else a step touches before that point is copied at each commit and laid over the live
state after a loss: module buffers (BatchNorm statistics change in the forward pass),
the plain entries, the RNG states, optimizer hyperparameters (a scheduler writes the
learning rate into them) and the state of other stateful objects (schedulers, a
GradScaler, user objects: small by nature; keep EMA weights in a module, whose weights
are not copied). Buffers go into copies kept from commit to commit (one foreach copy).
Objects a survivor kept across the rebuild (`ctx.keep`) get these parts back in place
(`put_back`); new objects get them through the tree they are loaded from (`lay_over`).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from elastictrain.runtime.rng import capture_rng, rng_state_of


def persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers `module.state_dict()` holds, under its names."""
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


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


def copy_tree(value: Any) -> Any:
    """Copy a state_dict-like tree: containers copied, tensors cloned, other leaves shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_tree(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(copy_tree(v) for v in value)
    return value


class CommitCopy:
    """The parts of a committed step a lost step could change before its optimizer step."""

    def __init__(self) -> None:
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}  # entry -> name -> copy, reused across commits
        self._plain: dict[str, Any] = {}
        self._rng: tuple = ()  # `capture_rng`'s form: converted only when a lost step needs it
        self._hyper: dict[str, list[dict]] = {}
        self._other: dict[str, Any] = {}

    def take(self, objects: dict[str, Any], plain: dict[str, Any]) -> None:
        """Copy from the unwrapped entries of a state that holds a committed step; `plain` is copied already."""
        self._plain, self._rng = plain, capture_rng()
        self._hyper, self._other = {}, {}
        sources, targets = [], []
        for name, obj in objects.items():
            if isinstance(obj, torch.nn.Module):
                kept = self._buffers.setdefault(name, {})
                live = dict(persistent_buffers(obj))
                for key in set(kept) - set(live):
                    del kept[key]
                for key, buf in live.items():
                    copy = kept.get(key)
                    if copy is None or copy.shape != buf.shape or copy.dtype != buf.dtype or copy.device != buf.device:
                        copy = kept[key] = torch.empty_like(buf, memory_format=torch.contiguous_format)
                    sources.append(buf.detach())
                    targets.append(copy)
            elif isinstance(obj, torch.optim.Optimizer):
                self._hyper[name] = [{k: copy_tree(v) for k, v in g.items() if k != "params"} for g in obj.param_groups]
            elif _is_stateful(obj):
                self._other[name] = copy_tree(obj.state_dict())
        for name in set(self._buffers) - {n for n, o in objects.items() if isinstance(o, torch.nn.Module)}:
            del self._buffers[name]
        if targets:
            torch._foreach_copy_(targets, sources)

    def lay_over(self, tree: dict) -> dict:
        """Put the copied parts into a tree of the live state (from `ElasticState.tree()`); returns it."""
        objects = tree["objects"]
        for name, kept in self._buffers.items():
            if name in objects:
                objects[name].update({key: copy.clone() for key, copy in kept.items()})
        for name, groups in self._hyper.items():
            if name in objects and len(objects[name]["param_groups"]) == len(groups):
                for group, hyper in zip(objects[name]["param_groups"], groups):
                    group.update(copy_tree(hyper))
        for name, saved in self._other.items():
            if name in objects:
                objects[name] = copy_tree(saved)
        objects.update(copy_plain(self._plain))
        tree["rng"] = rng_state_of(self._rng) if self._rng else {}
        return tree

    def put_back(self, name: str, obj: Any) -> None:
        """Put the copied parts of entry `name` back into `obj`, the live object itself (kept across a
        rebuild): buffers copied in place, hyperparameters set, a small stateful object loaded. Parameters
        and optimizer moments are not touched: they hold the committed step already."""
        if isinstance(obj, torch.nn.Module):
            kept = self._buffers.get(name, {})
            pairs = [(buf, kept[key]) for key, buf in persistent_buffers(obj) if key in kept]
            if pairs:
                with torch.no_grad():
                    torch._foreach_copy_([b for b, _ in pairs], [c for _, c in pairs])
        elif isinstance(obj, torch.optim.Optimizer):
            groups = self._hyper.get(name)
            if groups is not None and len(obj.param_groups) == len(groups):
                for group, hyper in zip(obj.param_groups, groups):
                    group.update(copy_tree(hyper))
        elif name in self._other:
            obj.load_state_dict(copy_tree(self._other[name]))


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
