"""Objects a worker keeps across entries of `train_fn` (`ctx.keep`): a survivor of a rebuild trains on
the model and optimizer it already holds instead of building and loading a second copy."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class KeptObjects:
    """Named objects built once per worker process, handed out again on each later entry of `train_fn`.

    What an entry that reached `ctx.state` did not ask for is dropped when it ends, and everything
    is dropped when the worker's run ends (`release`): nothing kept outlives `Runner.run`.
    """

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._asked: set[str] = set()
        self.built = 0  # factories called in this worker's run (a survivor's re-entry calls none)

    def begin_entry(self) -> None:
        self._asked = set()

    def keep(self, name: str, factory: Callable[[], T]) -> T:
        """The object kept under `name`, built by `factory()` the first time it is asked for.

        Raises:
            TypeError: `name` is not a non-empty string or `factory` is not callable.
            ValueError: `name` was already asked for in this entry of `train_fn`.
            Whatever `factory` raises: nothing is kept under `name` then.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"ctx.keep(name, factory): name must be a non-empty string, not {name!r}")
        if not callable(factory):
            raise TypeError(f"ctx.keep({name!r}, factory): factory must be callable (say, a class or a lambda), "
                            f"not {type(factory).__name__}")
        if name in self._asked:
            raise ValueError(f"ctx.keep({name!r}) was already called in this entry of train_fn: "
                             "give each kept object its own name")
        self._asked.add(name)
        if name in self._objects:
            return self._objects[name]
        try:
            obj = factory()
        except BaseException:
            self._asked.discard(name)
            raise
        self.built += 1
        self._objects[name] = obj
        return obj

    def end_entry(self, *, registered: bool) -> None:
        """The entry of `train_fn` ended: when it got as far as `ctx.state` (`registered`), drop what it did
        not ask for (a loop that stopped keeping it); an entry cut short keeps everything for the next."""
        if not registered:
            return
        for name in set(self._objects) - self._asked:
            del self._objects[name]

    def release(self) -> None:
        """The worker's run ended: drop everything."""
        self._objects.clear()
        self._asked = set()

    def __contains__(self, name: str) -> bool:
        return name in self._objects

    def __len__(self) -> int:
        return len(self._objects)


def unhook_ddp(ddp: Any) -> None:
    """Take off a kept module what a DDP wrapper of an ended world hung on it: its reducer's autograd
    hooks (a stale reducer would all-reduce on the dead group), the accumulate-grad hooks of its
    Python reducer, and the forward pre-hooks of its mixed precision (each new wrapper adds its own:
    they would pile up, one more cast per forward and rebuild)."""
    remove = getattr(ddp, "_remove_autograd_hooks", None)
    if remove is not None:
        remove()
    for handle in getattr(ddp, "_accum_grad_hooks", ()):
        handle.remove()
    module = getattr(ddp, "module", None)
    if module is None:
        return
    for sub in module.modules():
        for key, hook in list(sub._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is ddp:  # a bound method of this wrapper
                del sub._forward_pre_hooks[key]
                sub._forward_pre_hooks_with_kwargs.pop(key, None)
