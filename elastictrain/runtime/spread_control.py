"""The driver's side of spread placement (`ScalingConfig.spread_by`): the thin layer between the pure
tracker (`fleet/spread_tracker.py`) and the cluster.

It reads where started workers landed (each worker's node labels, from its `identity()`) and where the
cluster has room, gives each start its label selector, stops workers pending too long so their
replacements start relaxed, says when the spread goes unmet and is restored, and restores it one move
at a time: a worker started on an under-represented value, then a worker of an over-share value asked
to leave at a step boundary (the same clean leave as a preemption notice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from elastictrain.events import event
from elastictrain.fleet.spread import SpreadPolicy, Target, room_by_value
from elastictrain.fleet.spread_tracker import SpreadTracker

if TYPE_CHECKING:
    from elastictrain.runtime.driver import Driver

MOVE_CHECK_S = 1.0


class SpreadControl:
    """Spread placement for one driver."""

    def __init__(self, driver: "Driver") -> None:
        scaling = driver.spec.scaling
        self.driver = driver
        self.label = scaling.spread_by
        self.tracker = SpreadTracker(
            SpreadPolicy(scaling.spread_by, scaling.max_share, scaling.max_workers + scaling.spares),
            scaling.spread_pending_timeout_s,
        )
        self.retired: set[str] = set()  # stopped by this layer (pending too long): their exit is no failure
        self._next_move_check = 0.0

    def _room(self) -> dict[str, int]:
        capacity = getattr(self.driver.workers, "capacity", None)
        nodes = capacity() if capacity is not None else []
        need = self.driver.placement.resources()
        return room_by_value(nodes, self.label, need, self.driver.spec.scaling.label_selector)

    def targets(self, count: int) -> list[Target]:
        return self.tracker.targets(count, self._room()) if count else []

    def started(self, member: str, target: Optional[Target]) -> None:
        if target is not None:
            self.tracker.started(member, target, self.driver.clock())

    def gone(self, member: str) -> bool:
        """Forget `member`; True when this layer stopped it (not a failure)."""
        self.tracker.gone(member)
        if member in self.retired:
            self.retired.discard(member)
            return True
        return False

    def tick(self, now: float) -> None:
        """Observe placements, pending workers, compliance and moves once (the driver's health cadence)."""
        driver = self.driver
        placements = getattr(driver.workers, "placements", None)
        for member, labels in (placements() if placements is not None else {}).items():
            value = labels.get(self.label) if isinstance(labels, dict) else None
            self.tracker.landed(member, value if isinstance(value, str) and value else None)
        for member in self.tracker.overdue(now):
            driver.record(event("spread_pending", member=member, label=self.label,
                                pending_s=self.tracker.pending_timeout_s))
            self.retired.add(member)
            driver.workers.kill(member)  # its exit refills the pool with a relaxed start
        changed = self.tracker.assess()
        if changed is not None:
            kind, found = changed
            driver.record(event(kind, label=self.label, shares=found.shares, counts=found.counts,
                                max_share=self.tracker.policy.max_share, cap=found.cap))
        if driver.placement.ended or now < self._next_move_check:
            return
        self._next_move_check = now + MOVE_CHECK_S
        self._move(now)

    def _move(self, now: float) -> None:
        driver, tracker = self.driver, self.tracker
        if tracker.met and tracker.mover is None:
            return
        target = tracker.plan_mover(now, self._room())
        if target is not None:
            member = driver.start_worker(target)
            tracker.mover_started(member, target, now)
            return
        world = driver.log.world_members
        leader = next((m for m, info in world.items() if info.get("leader")), None)
        waiting = driver.election.live_ids(driver.spec.failure.heartbeat_timeout_s) - set(world)
        ask = tracker.ask(waiting, world, leader)
        if ask is not None and driver.election.ask_to_leave(ask.member, reason="spread"):
            driver.record(event("spread_move", member=ask.member, label=self.label, away_from=ask.away_from,
                                to=ask.to, replacement=ask.mover))
