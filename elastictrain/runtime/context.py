"""`Context`: what `train_fn(ctx)` sees on a worker. A new one for every world."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

from elastictrain.election.topology import WORLD, Topology
from elastictrain.errors import NotInWorker
from elastictrain.events import event
from elastictrain.runtime.keep import unhook_ddp
from elastictrain.runtime.records import to_plain
from elastictrain.runtime.session import Session
from elastictrain.runtime.state import ElasticState
from elastictrain.runtime.world import WorldInfo

T = TypeVar("T")
_current: Optional["Context"] = None
_current_lock = threading.Lock()


def get_context() -> "Context":
    """The `Context` of the `train_fn` running in this process.

    Raises:
        NotInWorker: called outside a worker's `train_fn`.
    """
    with _current_lock:
        ctx = _current
    if ctx is None:
        raise NotInWorker("et.get_context() is only available inside train_fn on a worker")
    return ctx


def _set_current(ctx: Optional["Context"]) -> None:
    global _current
    with _current_lock:
        _current = ctx


class Context:
    """The worker's view of the run for one world (term).

    Attributes:
        rank, world_size: this worker's place in the current world.
        term: the term of the current world; it grows with every rebuild (`generation` is its old name).
        device: where the model lives (cuda:N with use_gpu, else cpu).
        is_leader: whether this worker leads the current term.
    """

    def __init__(self, session: Session, world: WorldInfo, device: torch.device) -> None:
        self._session = session
        self._world = world
        self.device = device
        self._state: Optional[ElasticState] = None
        self._accumulators: dict[tuple[int, int], Any] = {}
        self._vote_carrier: Optional[Any] = None  # the step whose all-reduce carries the next boundary vote
        self._wrappers: list[torch.nn.parallel.DistributedDataParallel] = []  # made by prepare_model in this world

    # --- identity -----------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._world.rank

    @property
    def world_size(self) -> int:
        return self._world.world_size

    @property
    def term(self) -> int:
        return self._world.term

    @property
    def generation(self) -> int:
        """Deprecated name of `term`."""
        import warnings

        warnings.warn("ctx.term is now ctx.term", DeprecationWarning, stacklevel=2)
        return self._world.term

    @property
    def is_leader(self) -> bool:
        return self._world.is_leader

    @property
    def member_id(self) -> str:
        return self._world.member_id

    @property
    def topology(self) -> Topology:
        """Every rank's labels and the world's named groups (`ScalingConfig.group_by`)."""
        return self._session.topology

    def group(self, name: str = WORLD) -> Any:
        """The process group of a named group of this world: `"world"`, or with
        `ScalingConfig(group_by=["region"])` say `"region:us-east"` and `"leaders:region"`.

        Raises:
            KeyError: no such group, or this rank is not in it (the message lists its groups).
        """
        return self._session.group(name)

    # --- model and state ----------------------------------------------------

    def keep(self, name: str, factory: Callable[[], T]) -> T:
        """What `factory()` built on this worker's first entry of `train_fn`; the same object on later entries.

        A survivor of a rebuild re-enters `train_fn` with its model and optimizer as they are: no
        second copy is built or loaded (memory and time stay flat in the model's size), and
        `ctx.state` puts back in place only what a step lost in flight changed (buffers, plain
        entries, RNG). A new member calls the factory and receives the state.

        Example:
            net = ctx.keep("net", Net)
            model = ctx.prepare_model(net)  # DDP over the new world wraps the same module
            opt = ctx.keep("opt", lambda: torch.optim.AdamW(net.parameters(), lr=3e-4))
            state = ctx.state(model=model, optimizer=opt)

        Raises:
            ValueError: `name` was already used in this entry of `train_fn`.
            TypeError: `name` is not a string or `factory` is not callable.
        """
        return self._session.keep(name, factory)

    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move `model` to `ctx.device` and wrap it in DDP over the current world.

        Call it on every entry of `train_fn`; after a rebuild it wraps the new
        model over the new world. With one worker the module is returned unwrapped.
        A `torch.compile`d model may be passed (or the result compiled): state and
        checkpoints use the plain module's names either way, and a survivor's new
        instance reuses the process's compiled code.

        DDP's constructor does not broadcast the parameters (`init_sync=False`): `ctx.state()`
        brings every rank to the committed state, survivors from their own memory (checked by a
        fingerprint, no model-sized traffic among them) and new members by rank 0's broadcast.
        """
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        if self.device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [self.device.index])
        ddp_kwargs.setdefault("process_group", self.group())
        ddp_kwargs.setdefault("init_sync", False)
        ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        self._wrappers.append(ddp)
        return ddp

    def _release_wrappers(self) -> None:
        """The world ended: take its DDP wrappers' hooks off the modules, which a kept module carries
        into the next world (`keep.unhook_ddp`)."""
        wrappers, self._wrappers = self._wrappers, []
        for ddp in wrappers:
            unhook_ddp(ddp)

    def state(self, **objects: Any) -> ElasticState:
        """Register the training state and restore it to the last committed step.

        Stateful objects (model, optimizer, scheduler) are restored in place;
        other keyword values become attributes of the returned state. On a
        fresh start nothing is restored and `state.step` is 0. On a survivor, objects
        that are the live ones (`ctx.keep`) are not loaded at all: only what a step lost
        in flight changed is put back into them.
        """
        if self._state is not None:
            raise RuntimeError("ctx.state() was already called in this entry of train_fn")
        state = ElasticState(objects)
        self._session.restore(state)
        self._state = state
        return state

    # --- the loop -----------------------------------------------------------

    def steps(self, total_steps: int) -> Iterator[int]:
        """Yield step numbers from the committed step up to `total_steps`.

        A step is committed when the loop body returns; a world change interrupts
        the body, and the rebuilt world resumes at the last committed step.
        """
        state = self._state
        if state is None:
            raise RuntimeError("call ctx.state(model=..., optimizer=...) before ctx.steps()")
        if total_steps < 0:
            raise ValueError(f"total_steps={total_steps} must be >= 0")
        session = self._session
        session.loop(True)
        try:
            while state.step < total_steps:
                carrier, self._vote_carrier = self._vote_carrier, None
                carried = carrier.extra if carrier is not None and carrier._finished else None
                session.step_begins(state, carried)
                step = state.step
                yield step
                state.step = step + 1
                session.step_ends(state, step)
        finally:
            session.loop(False)

    def accumulate(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any):
        """One optimizer step over this rank's micro-batches; one all-reduce.

        Returns a context manager whose `backward(loss_sum, num_items=n)` takes a
        summed loss and its item count; `.loss` is the global mean loss afterwards.
        Keyword arguments (scaler, autocast_dtype, max_grad_norm, fp32_grad_accum)
        go to `GradAccumulator` on the first call for this (model, optimizer).
        """
        from elastictrain.accumulate import GradAccumulator, plan_rank

        self._session.progress()
        key = (id(model), id(optimizer))
        acc = self._accumulators.get(key)
        if acc is None:
            if self.world_size > 1:
                kwargs.setdefault("process_group", self.group())
            acc = GradAccumulator(model, optimizer, **kwargs)
            self._accumulators[key] = acc
        batch = self._session.batch
        plan = plan_rank(batch.global_batch_size, batch.micro_batch_size, self.world_size, self.rank)
        # The boundary vote rides on the step's item-count all-reduce: no collective of its own.
        step = acc.step(num_micro_batches=plan.num_micro_batches, extra=self._session.vote())
        self._vote_carrier = step
        return step

    def micro_batches(
        self,
        dataset: Any,
        step: int,
        collate_fn: Optional[Callable] = None,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
    ) -> Iterator[Any]:
        """This rank's micro-batches of global step `step` (the same samples at any world size).

        Step s takes samples [s*G, (s+1)*G) of the source, split over the ranks alive. The
        position is a function of the step, so a rebuild or a restart from a checkpoint
        resumes at the exact sample; within one entry of train_fn a stream stays open and
        DataLoader workers keep loading ahead, and both stop when the entry ends.

        Args:
            dataset: A map-style dataset (seeded permutation per epoch), an `et.ShardStream`
                (or its `.shuffled(window)`), a Hugging Face or torch `IterableDataset`, or
                another re-iterable (the stream's order; a partial last global batch is dropped).
            step: The global step; within an entry each step is asked for once, in order.
            collate_fn: Turns a list of samples into a batch (torch's default_collate if None);
                with workers, the first call's runs in them for the whole entry.
            num_workers: DataLoader worker processes loading this rank's steps ahead; 0 loads
                here. Either way the batches are the same, in the same order.
            prefetch_factor: Steps each worker loads ahead.

        Raises:
            UnsupportedSource, StepOrderError, StreamExhausted (from `elastictrain.errors`).
        """
        feeds = self.__dict__.get("_data_feeds")
        if feeds is None:
            from elastictrain.accumulate.feeds import DataFeeds

            feeds = self._data_feeds = DataFeeds()
        return feeds.micro_batches(
            dataset,
            step,
            rank=self.rank,
            world_size=self.world_size,
            batch=self._session.batch,
            collate_fn=collate_fn,
            device=self.device,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
        )

    def _close_data(self) -> None:
        """The entry of train_fn ended: stop its DataLoader workers and drop its open streams."""
        feeds = self.__dict__.pop("_data_feeds", None)
        if feeds is not None:
            feeds.close()

    def report(self, metrics: dict[str, Any]) -> None:
        """Send metrics to the driver (rank 0's are kept; the call does not block).

        Inside the loop body of step s they are stamped with step s (unless `metrics` has a "step").
        Call it on every rank: each keeps its recent reports, so when rank 0 dies before its last
        reports reach the driver, the next rank 0 sends its own of those steps instead.
        Values must be plain: numbers, strings, bools, None, lists and dicts of them; tensors and numpy
        values are sent as numbers or lists (`tolist()`).

        Raises:
            TypeError: a value of another type (the message names it).
        """
        step = self._state.step if self._state is not None else None
        self._session.report({**event("metrics", step=step, term=self.term), **to_plain(metrics)})
