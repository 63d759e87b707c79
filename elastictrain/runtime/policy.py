"""The driver's policies: pure objects fed what happened to the workers, returning decisions.

The driver (`runtime/driver.py`) acts on a `Decision`: start workers, or end the run. The shape
follows a failure policy that says retry or raise, and a placement policy that says how many
workers to start and with which Ray options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from elastictrain.config import ScalingConfig


@dataclass(frozen=True)
class Decision:
    """What the driver does next: start `spawn` workers, or end the run because of `fail`."""

    spawn: int = 0
    fail: Optional[str] = None


@dataclass
class FailurePolicy:
    """How many lost workers a run tolerates.

    Args:
        max_failures: lost workers tolerated; -1 for no limit.
    """

    max_failures: int
    failures: int = 0

    def on_lost(self, member_id: str) -> Decision:
        """A worker's process died or was killed (a lapsed heartbeat, a hang): count it."""
        self.failures += 1
        if 0 <= self.max_failures < self.failures:
            return Decision(fail=f"{self.failures} workers lost, more than max_failures={self.max_failures}")
        return Decision()

    def on_error(self, member_id: str, reason: str) -> Decision:
        """The user's `train_fn` raised on a worker: the run ends with that reason."""
        return Decision(fail=reason)


@dataclass
class PlacementPolicy:
    """How many workers the pool holds and where they go; stops refilling once the run ended.

    The pool is `max_workers` plus `spares`: spares run the same worker, wait outside a full world and
    join the next rebuild; the refill after a loss replaces whichever was consumed.

    Args:
        scaling: the run's scaling config (pool size, resources, node labels).
    """

    scaling: ScalingConfig
    active: set[str] = field(default_factory=set)
    ended: bool = False

    def start(self) -> Decision:
        return self._refill()

    def spawned(self, member_id: str) -> None:
        self.active.add(member_id)

    def gone(self, member_id: str) -> Decision:
        """A worker was lost or left: replace it while the run goes on."""
        self.active.discard(member_id)
        return self._refill()

    def returned(self, member_id: str, status: str) -> Decision:
        """A worker's run returned: it finished the loop or saw the run end. No replacement follows."""
        self.active.discard(member_id)
        if status in ("finished", "ended"):
            self.ended = True
        return Decision()

    def failed(self, member_id: str) -> None:
        """A worker ended the run with an error; the pool does not refill."""
        self.active.discard(member_id)

    def actor_options(self, spread: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """Ray actor options of one start: its CPUs, GPUs (one with `use_gpu`, unless
        `resources_per_worker` names another amount), custom resources and node labels: the user's
        `label_selector` and, with `spread_by`, this start's `spread` entry (say `{"provider": "in(aws,gcp)"}`)."""
        resources = dict(self.scaling.resources_per_worker)
        gpus = resources.pop("GPU", 1.0 if self.scaling.use_gpu else 0.0)
        options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0), "num_gpus": gpus}
        if resources:
            options["resources"] = resources
        selector = {**(self.scaling.label_selector or {}), **(spread or {})}
        if selector:
            options["label_selector"] = selector
        return with_region_policy(options, self.scaling)

    def resources(self) -> dict[str, float]:
        """What one worker reserves, by Ray resource name (how many fit on a node)."""
        options = self.actor_options()
        return {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}

    def _refill(self) -> Decision:
        if self.ended:
            return Decision()
        return Decision(spawn=max(0, self.pool_size - len(self.active)))

    @property
    def pool_size(self) -> int:
        """Workers kept started: the world's `max_workers` and the warm `spares` that wait outside it."""
        return self.scaling.max_workers + self.scaling.spares


def with_region_policy(options: dict[str, Any], scaling: ScalingConfig) -> dict[str, Any]:
    """`options` with the jurisdiction policy's region selector (`ScalingConfig.allowed_regions`) added to
    its label selector, whatever else built it (composable with other placement)."""
    from elastictrain.fleet.jurisdiction import region_selector

    extra = region_selector(scaling.allowed_regions, options.get("label_selector"))
    if extra:
        options = {**options, "label_selector": {**(options.get("label_selector") or {}), **extra}}
    return options
