"""The elastic state: what `ctx.state(...)` registers, restores and hands to new members.

Tensors are never copied per step. A survivor keeps the objects of its last entry;
on re-entry the objects it kept (`ctx.keep`) are the live ones and nothing is loaded
into them; objects built anew are loaded from the live ones once. Members behind the
newest one (or new) receive rank 0's state by broadcast. What is copied at each
commit is small (`rollback.CommitCopy`): buffers, plain entries, RNG states and
small stateful objects, so a step lost in flight leaves nothing behind.
Models are saved under the names of the plain module, whatever wraps them (DDP,
`torch.compile`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist

from elastictrain.errors import StateRefused
from elastictrain.runtime.layout import OwnLayout, StateLimits, TensorSpec, check_layout, parse_header
from elastictrain.runtime.rng import rng_state, set_rng_state
from elastictrain.runtime.rollback import CommitCopy, copy_plain
from elastictrain.runtime.transfer import receive_tensors, send_tensors
from elastictrain.statetree import flatten_state, unflatten_state

__all__ = ["ElasticState", "StateLimits", "agree_or_broadcast", "broadcast_tree", "take_rank0_state", "copy_plain", "fingerprint", "plain_module",
           "rng_state", "set_rng_state"]

_RESERVED = {"step"}
MAX_HEADER_BYTES = 100_000_000  # the skeleton and tensor layout a broadcast may carry, as a checkpoint's table


def plain_module(obj: Any) -> Any:
    """The module inside DDP and `torch.compile` wrappers (any nesting); other objects as they are."""
    while True:
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            obj = obj.module
        elif _is_compiled(obj):
            obj = obj._orig_mod
        else:
            return obj


def _is_compiled(obj: Any) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(obj, eval_frame.OptimizedModule)


_unwrap = plain_module


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


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
        """Drop DDP and compile wrappers (DDP holds the old process group), keeping the modules and their state."""
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.Module):
                self._objects[name] = plain_module(obj)

    def commit_copy(self, reuse: Optional[CommitCopy] = None) -> CommitCopy:
        """Copy what a lost step could change before its optimizer step (see `rollback`); `reuse` keeps
        the buffer copies of the last commit."""
        copy = reuse if isinstance(reuse, CommitCopy) else CommitCopy()
        copy.take({n: plain_module(o) for n, o in self._objects.items()}, self.plain())
        return copy

    def kept_from(self, live: "ElasticState") -> set[str]:
        """The stateful entries of this state that are the very objects of `live` (kept across the entry)."""
        return {n for n, o in self._objects.items()
                if n in live._objects and _is_stateful(_unwrap(o)) and _unwrap(o) is _unwrap(live._objects[n])}

    def carry_over(self, live: "ElasticState", at_commit: Optional[CommitCopy]) -> set[str]:
        """Bring this state, registered by a survivor's new entry, to the committed step `live` holds.

        Entries that are `live`'s own objects are not loaded: what a step lost in flight changed in
        them (buffers, optimizer hyperparameters, small stateful objects) is put back in place from
        `at_commit`, and a module's gradients of that step are dropped. Entries built anew are loaded
        from `live`'s objects as before. Plain entries, the step and the RNG states come from `live`
        and `at_commit`. Returns the names of the kept entries.
        """
        kept = self.kept_from(live)
        tree = live.tree(with_rng=False, skip=kept)
        if at_commit is not None:
            at_commit.lay_over(tree)
            for name in kept:
                at_commit.put_back(name, _unwrap(self._objects[name]))
        for name in kept:
            obj = _unwrap(self._objects[name])
            if isinstance(obj, torch.nn.Module):
                obj.zero_grad(set_to_none=True)  # a new object would hold none either
        self.load_tree(tree, skip=kept)
        return kept

    def tree(self, *, with_rng: bool = True, skip: frozenset[str] | set[str] = frozenset()) -> dict:
        """The whole state as a tree of tensors and plain values (no copies); entries in `skip` are left out."""
        objects = {}
        for name, obj in self._objects.items():
            if name in skip:
                continue
            obj = _unwrap(obj)
            objects[name] = obj.state_dict() if _is_stateful(obj) else obj
        tree = {"step": self.step, "objects": objects}
        if with_rng:
            tree["rng"] = rng_state()
        return tree

    def agreed_tree(self) -> dict:
        """What every rank of a synchronous world holds alike: each model's parameters, the state of
        optimizers and other stateful objects, the step. Not buffers (each rank updates its running
        statistics from its own batches; DDP sends rank 0's at the next forward), not plain entries
        (a rank may keep its own), not RNG states."""
        objects = {}
        for name, obj in self._objects.items():
            obj = _unwrap(obj)
            if isinstance(obj, torch.nn.Module):
                objects[name] = dict(obj.named_parameters())
            elif _is_stateful(obj):
                objects[name] = obj.state_dict()
        return {"step": self.step, "objects": objects}

    def load_tree(self, tree: dict, *, skip: frozenset[str] | set[str] = frozenset()) -> None:
        """Load a tree made by `tree()` into these objects; entries in `skip` are left as they are."""
        objects = tree["objects"]
        missing = set(self._objects) - set(objects) - set(skip)
        if missing:
            raise KeyError(f"restored state lacks entries {sorted(missing)} that ctx.state() registered")
        for name, obj in self._objects.items():
            if name in skip:
                continue
            target = _unwrap(obj)
            if _is_stateful(target):
                target.load_state_dict(objects[name])
            else:
                self._objects[name] = objects[name]
        self.step = int(tree["step"])
        if "rng" in tree:
            set_rng_state(tree["rng"])

    def layout(self) -> OwnLayout:
        """This state's tensor layout, what a received state is checked against."""
        return self.layout_of(self.flatten()[0])

    def layout_of(self, tensors: dict[str, torch.Tensor]) -> OwnLayout:
        """The layout of `tensors`, this state's own as `flatten()` gave them."""
        modules = [n for n, o in self._objects.items() if isinstance(_unwrap(o), torch.nn.Module)]
        return OwnLayout.of(tensors, self._objects, modules)

    def filled_in_place(self, tree: dict, own: dict[str, torch.Tensor]) -> set[str]:
        """The models whose every parameter and buffer already holds what `tree` carries: each of its
        tensors is one of `own` (this state's, by `flatten()`) and is the model's own storage. Loading
        them would copy each tensor onto itself."""
        done = set()
        for name, obj in self._objects.items():
            module = _unwrap(obj)
            received = tree["objects"].get(name)
            if not isinstance(module, torch.nn.Module) or not isinstance(received, dict):
                continue
            if any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in module.modules()):
                continue  # the user's hooks run on a load
            live = dict(module.named_parameters(remove_duplicate=False))
            live.update(module.named_buffers(remove_duplicate=False))
            if set(received) == set(module.state_dict()) and all(
                    isinstance(t, torch.Tensor) and t is own.get(f"objects/{name}/{key}") and key in live
                    and live[key].data_ptr() == t.data_ptr() and live[key].shape == t.shape
                    for key, t in received.items()):
                done.add(name)
        return done

    def flatten(self) -> tuple[dict[str, torch.Tensor], Any]:
        """Named tensors and skeleton, for checkpoints."""
        return flatten_state(self.tree())


def broadcast_tree(tree: Optional[dict], *, src: int, device: torch.device, group: Any = None,
                   expect: Optional[OwnLayout] = None, limits: StateLimits = StateLimits()) -> dict:
    """Send the state tree of rank `src` of `group` (default: the default group) to its every rank;
    returns the tree.

    The skeleton and tensor layout travel as JSON bytes (no pickle: peers trust no
    object from another machine). A receiver parses them against an allow-list of
    dtypes and, given `expect` (its own state's layout), checks the announced layout
    against it within `limits` before it allocates anything (`layout.check_layout`).
    Every rank then learns every receiver's verdict, so a refusal raises on all ranks
    together instead of leaving the others blocked in a broadcast. Tensors travel on
    `device` (CUDA for NCCL, CPU for gloo) packed in buckets or in large pieces with one
    bucket of staging memory (`transfer`), and land where the source kept them (a CPU
    optimizer step count stays on the CPU).

    Raises:
        StateRefused: on every rank, when any receiver refused the header (the refusing rank says why).
    """
    return _broadcast_tree(tree, src=src, device=device, group=group, expect=expect, limits=limits, into=None)


def _broadcast_tree(tree: Optional[dict], *, src: int, device: torch.device, group: Any,
                    expect: Optional[OwnLayout], limits: StateLimits,
                    into: Optional[dict[str, torch.Tensor]]) -> dict:
    """`broadcast_tree`; a receiver takes the bytes of a tensor it holds in `into` (same name, shape,
    dtype and home) into that tensor instead of a new one."""
    rank = dist.get_rank(group)
    if rank == src:
        if tree is None:
            raise ValueError("the broadcast source has no state")
        tensors, skeleton = flatten_state(tree)
        layout = [TensorSpec(n, tuple(t.shape), t.dtype, t.device.type) for n, t in tensors.items()]
        header = _encode_header(skeleton, layout)
    else:
        tensors, header = {}, b""
    size = torch.tensor([len(header)], dtype=torch.int64, device=device)
    dist.broadcast(size, group=group, group_src=src)  # every rank learns the size, so every rank refuses an oversized state together
    nbytes = int(size.item())
    if not 0 < nbytes <= MAX_HEADER_BYTES:
        raise ValueError(f"the state's skeleton and tensor names take {nbytes} bytes, over {MAX_HEADER_BYTES}: "
                         "keep large values in tensors, not in plain lists")
    raw = (torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device) if rank == src
           else torch.empty(nbytes, dtype=torch.uint8, device=device))
    dist.broadcast(raw, group=group, group_src=src)
    refusal = None
    if rank != src:
        try:
            skeleton, layout = parse_header(bytes(raw.cpu().numpy()))
            if expect is not None:
                check_layout(layout, expect, limits)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the other ranks must learn it
            refusal = exc if isinstance(exc, ValueError) else ValueError(f"{type(exc).__name__}: {exc}")
    _share_verdict(refusal, rank=rank, device=device, group=group)
    if rank == src:
        send_tensors([tensors[spec.name] for spec in layout], src=src, device=device, group=group)
        return tree
    received = receive_tensors(layout, src=src, device=device, group=group, into=into)
    try:
        return unflatten_state(received, skeleton)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"the state broadcast by rank 0 is malformed: {exc}") from None


def _encode_header(skeleton: Any, layout: list[TensorSpec]) -> bytes:
    entries = [[s.name, list(s.shape), str(s.dtype).removeprefix("torch."), s.home] for s in layout]
    return json.dumps({"skeleton": skeleton, "layout": entries}, separators=(",", ":"), allow_nan=False).encode()


def _share_verdict(refusal: Optional[Exception], *, rank: int, device: torch.device, group: Any) -> None:
    """Every rank learns whether any receiver refused the header (one all-reduce of the highest refusing
    rank + 1), before any rank allocates or sends a tensor; raise on all of them if one did."""
    verdict = torch.tensor([0 if refusal is None else rank + 1], dtype=torch.int64, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=group)
    refused_by = int(verdict.item()) - 1
    if refusal is not None:
        raise StateRefused(f"refused the state rank 0 broadcast: {refusal}")
    if refused_by >= 0:
        raise StateRefused(f"rank {refused_by} refused the state rank 0 broadcast (its error says why); "
                         "no rank took it")


FINGERPRINT_SAMPLES = 4096
"""Elements each tensor contributes to a state's fingerprint, evenly strided: a pass over a few KiB, not the model."""


def fingerprint(tree: dict) -> torch.Tensor:
    """A float64 vector that equal states share bit for bit: per tensor, the sum of an evenly strided
    sample of its elements and of their squares, plus a digest of the skeleton (names, shapes, dtypes
    and plain values). Cheap at any model size; it tells a survivor holding another step's state, or a
    fresh initialisation, from one holding the same state."""
    tensors, skeleton = flatten_state(tree)
    layout = [[n, list(t.shape), str(t.dtype)] for n, t in tensors.items()]
    digest = hashlib.blake2b(json.dumps([skeleton, layout], sort_keys=True, default=str).encode(), digest_size=6)
    parts = [float(int.from_bytes(digest.digest(), "big"))]  # 48 bits: exact in a float64
    for t in tensors.values():
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            parts += [0.0, 0.0]
            continue
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].to(torch.float64)
        parts += [sample.sum().item(), (sample * sample).sum().item()]
    return torch.tensor(parts, dtype=torch.float64)


def agree_or_broadcast(state: "ElasticState", *, device: torch.device, group: Any = None,
                       limits: StateLimits = StateLimits()) -> bool:
    """Check that every rank of `group` holds the same state (its fingerprint, two small all-reduces);
    when one does not, every rank takes rank 0's by broadcast. Returns True when they agreed.

    Survivors of a rebuild at the same committed step hold the same state already, so no model-sized
    traffic passes among them; this check is what lets DDP's constructor skip its own broadcast."""
    mine = fingerprint(state.agreed_tree())
    size = torch.tensor([float(mine.numel())], dtype=torch.float64, device=device)
    sizes = torch.cat([size, -size])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    same = bool(sizes[0] == -sizes[1])
    if same:
        both = torch.cat([mine, -mine]).to(device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        n = mine.numel()
        same = bool(torch.equal(both[:n], -both[n:]))  # the largest equals the smallest on every entry
    if not same:
        take_rank0_state(state, device=device, group=group, limits=limits)
    return same


def take_rank0_state(state: "ElasticState", *, device: torch.device, group: Any = None,
                     limits: StateLimits = StateLimits()) -> None:
    """Every rank of `group` loads the state of its rank 0 (whose own state stays as it is). Each other
    rank first checks what rank 0 announces against its own state's layout (`layout.check_layout`).

    Raises:
        StateRefused: on every rank, when a rank refused what rank 0 announced.
    """
    rank = dist.get_rank(group)
    if rank == 0:
        _broadcast_tree(state.tree(), src=0, device=device, group=group, expect=None, limits=limits, into=None)
        return
    own, _ = state.flatten()  # the tensors it holds receive rank 0's bytes in place
    tree = _broadcast_tree(None, src=0, device=device, group=group, expect=state.layout_of(own), limits=limits,
                           into=own)
    state.load_tree(tree, skip=state.filled_in_place(tree, own))
