"""What a `Context` asks of the runtime for one world, and the per-term object that answers.

Imports go one way: the runner makes a `TermSession` per world and hands it to the `Context`;
the context knows only the `Session` protocol, never the runner.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

import torch

from elastictrain.config import BatchConfig
from elastictrain.election.topology import WORLD, Topology
from elastictrain.runtime.state import ElasticState
from elastictrain.runtime.world import WorldInfo

if TYPE_CHECKING:
    from elastictrain.runtime.runner import Runner


class Session(Protocol):
    """The runtime's side of one world, as the context sees it."""

    @property
    def batch(self) -> BatchConfig: ...

    @property
    def topology(self) -> Topology: ...

    def group(self, name: str = WORLD) -> Any:
        """The process group of a named group of the topology (`"world"`: every rank)."""

    def keep(self, name: str, factory: Callable[[], Any]) -> Any:
        """The worker's object under `name`, built by `factory` the first time (`ctx.keep`)."""

    def restore(self, state: ElasticState) -> None:
        """Bring `state` to the world's committed step (memory, a peer, or storage)."""

    def loop(self, running: bool) -> None:
        """The training thread enters (True) or leaves (False) `ctx.steps`."""

    def step_begins(self, state: ElasticState, carried_vote: Optional[torch.Tensor]) -> None:
        """Before the body of step `state.step`: the boundary vote; raises on a world change."""

    def step_ends(self, state: ElasticState, step: int) -> None:
        """The body of `step` returned: `state.step` is `step + 1`; commit it."""

    def vote(self) -> torch.Tensor:
        """This rank's boundary vote, to ride on the step's all-reduce."""

    def report(self, record: dict) -> None:
        """A `ctx.report` record of this rank."""

    def progress(self) -> None:
        """The training thread did something (the hang detector's evidence of life)."""


class TermSession:
    """A `Session` bound to one runner, one world and its process groups; dropped when the world ends."""

    def __init__(self, runner: "Runner", world: WorldInfo, topology: Topology, groups: Mapping[str, Any]) -> None:
        self.runner = runner
        self.world = world
        self._topology = topology
        self._groups = dict(groups)

    @property
    def batch(self) -> BatchConfig:
        return self.runner.spec.batch

    @property
    def topology(self) -> Topology:
        return self._topology

    def group(self, name: str = WORLD) -> Any:
        self._topology.ranks(name)  # an unknown name fails with the names there are
        if name not in self._groups:
            raise KeyError(f"rank {self.world.rank} is not in group {name!r}; its groups: "
                           f"{list(self._topology.groups_of(self.world.rank))}")
        return self._groups[name]

    def keep(self, name: str, factory: Callable[[], Any]) -> Any:
        return self.runner.kept.keep(name, factory)

    def restore(self, state: ElasticState) -> None:
        self.runner.restore(state, self.world, group=self.group())

    def loop(self, running: bool) -> None:
        self.runner.in_loop = running

    def step_begins(self, state: ElasticState, carried_vote: Optional[torch.Tensor]) -> None:
        runner = self.runner
        runner.at_step_boundary(state, self.world, carried_vote=carried_vote, group=self.group())
        runner.in_flight = state.step
        runner.progress += 1

    def step_ends(self, state: ElasticState, step: int) -> None:
        runner = self.runner
        runner.in_flight = None
        runner.progress += 1
        runner.on_commit(state, self.world, step)

    def vote(self) -> torch.Tensor:
        return self.runner.vote(self.world)

    def report(self, record: dict) -> None:
        self.runner.report(record, self.world)

    def progress(self) -> None:
        self.runner.progress += 1

    # --- for fault schedules on local clusters (elastictrain.testing.faults) -------------------

    def wait_for_capacity(self, timeout_s: float) -> bool:
        """Hold until a live member waits outside this world (see `Runner.wait_for_capacity`)."""
        return self.runner.wait_for_capacity(self.world, timeout_s)

    def wait_for_faults(self, count: int, timeout_s: float) -> bool:
        """Hold until the driver has noted `count` injected faults (`RunView.note_fault`); False on timeout."""
        store, deadline = self.runner.election.store, time.monotonic() + timeout_s
        while len(store.keys("faults/")) < count:
            if time.monotonic() >= deadline or self.runner.stopping.wait(0.02):
                return False
        return True
