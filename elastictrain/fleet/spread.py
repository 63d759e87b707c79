"""Spread placement: no value of one node label (a provider, a region) holds more than `max_share` of the
workers. A pure policy: it takes where workers run and where the cluster has room, and returns Ray label
selectors (`in(a,b)`) for the workers to start and the moves that restore the spread; Ray's scheduler
picks the node. No Ray import.

The cap is in workers: `floor(max_share * pool)`, where the pool is `max_workers + spares` (a warm spare
enters the world at the next loss, so it counts like a world member). A start is never planned so that a
value could exceed the cap whichever of its allowed values Ray picks; when no value has both room and
headroom under the cap, the start is relaxed to wherever there is room, and the run continues unmet.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

# Roomy enough for any cluster; used when a worker needs no resource at all.
UNBOUNDED_SLOTS = 1 << 16


def spread_cap(max_share: float, pool: int) -> int:
    """The most workers one label value may hold: `max_share` of the pool, rounded down (1/3 of 3 is 1)."""
    return math.floor(max_share * pool + 1e-9)


def in_selector(values: Iterable[str]) -> str:
    """The Ray label selector expression matching any of `values` (Ray 2.60 syntax: `in(a,b)`)."""
    names = sorted(set(values))
    if not names:
        raise ValueError("a selector needs at least one value")
    return f"in({','.join(names)})"


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether a node with `labels` satisfies a Ray label selector: `v`, `!v`, `in(a,b)`, `!in(a,b)`."""
    for key, expr in selector.items():
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            wanted = {v.strip() for v in body[3:-1].split(",")}
        else:
            wanted = {body}
        present = labels.get(key) in wanted
        if present == negate:
            return False
    return True


def free_slots(free: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many more workers needing `need` fit in a node's `free` resources."""
    slots = UNBOUNDED_SLOTS
    for name, amount in need.items():
        if amount > 0:
            slots = min(slots, math.floor(free.get(name, 0.0) / amount + 1e-9))
    return max(0, slots)


def room_by_value(
    nodes: Iterable[tuple[Mapping[str, str], Mapping[str, float]]],
    label: str,
    need: Mapping[str, float],
    selector: Optional[Mapping[str, str]] = None,
) -> dict[str, int]:
    """Free worker slots per value of `label`, over the nodes (labels, free resources) that carry it and
    match the user's `selector`. A value whose nodes are full is listed with 0; a value with no node, not at all."""
    room: dict[str, int] = {}
    for labels, free in nodes:
        value = labels.get(label)
        if not value or (selector and not selector_matches(labels, selector)):
            continue
        room[value] = room.get(value, 0) + free_slots(free, need)
    return room


@dataclass(frozen=True)
class Target:
    """Where one worker may start: `values` of the label (None: anywhere the user's selector allows)."""

    values: Optional[tuple[str, ...]]
    relaxed: bool = False
    """True when the spread could not be met for it: it goes where there is room."""

    def selector(self, label: str) -> dict[str, str]:
        """The label selector entries this target adds to the worker's own."""
        return {} if self.values is None else {label: in_selector(self.values)}


@dataclass(frozen=True)
class Assessment:
    """Whether the placed workers obey the cap, and the shares that say so."""

    met: bool
    counts: dict[str, int]
    shares: dict[str, float]
    cap: int


@dataclass(frozen=True)
class Move:
    """Restore the spread: start a worker on one of `to` (values under the cap with room), then ask one
    worker on `away_from` (the most over-share value) to leave at a step boundary."""

    to: tuple[str, ...]
    away_from: str


@dataclass(frozen=True)
class SpreadPolicy:
    """The spread of one run.

    Args:
        label: the node label spread over (`ScalingConfig.spread_by`).
        max_share: the largest fraction of the pool on one value.
        pool: workers the run holds (`max_workers + spares`).
    """

    label: str
    max_share: float
    pool: int

    @property
    def cap(self) -> int:
        return spread_cap(self.max_share, self.pool)

    def assess(self, placed: Iterable[str]) -> Assessment:
        """Judge the label values of the placed workers against the cap."""
        counts = dict(Counter(placed))
        total = sum(counts.values())
        shares = {v: round(n / total, 4) for v, n in counts.items()} if total else {}
        return Assessment(all(n <= self.cap for n in counts.values()), dict(sorted(counts.items())),
                          dict(sorted(shares.items())), self.cap)

    def plan_starts(
        self,
        count: int,
        placed: Iterable[str],
        pending: Sequence[Optional[tuple[str, ...]]],
        room: Mapping[str, int],
        relax: int = 0,
    ) -> list[Target]:
        """Targets of `count` workers to start, the first `relax` of them relaxed (a retarget after a
        worker stayed pending too long).

        Args:
            placed: label values of the workers running.
            pending: the allowed values of each worker started and not yet placed (None: any).
            room: free worker slots per label value (`room_by_value`).
        """
        counts = Counter(placed)
        worst = Counter(v for allowed in pending if allowed for v in allowed)  # if every pending one lands on v
        budget = {v: max(0, min(self.cap - counts[v] - worst[v], slots - worst[v])) for v, slots in room.items()}
        chosen: list[Optional[set[str]]] = []
        for _ in range(count - min(relax, count)):
            best = sorted((v for v, b in budget.items() if b > 0), key=lambda v: (-budget[v], counts[v], v))
            if not best:
                chosen.append(None)
                continue
            budget[best[0]] -= 1
            chosen.append({best[0]})
        # Widen each target by one more value with headroom: Ray then has a choice of nodes, and headroom is
        # left for starts planned before these land (a wider set reserves headroom on every value it names).
        for allowed in chosen:
            extra = sorted((v for v, b in budget.items() if b > 0 and allowed is not None and v not in allowed),
                           key=lambda v: (-budget[v], v))
            if extra:
                allowed.add(extra[0])
                budget[extra[0]] -= 1
        roomy = tuple(sorted(v for v, slots in room.items() if slots > 0))
        unconstrained = [Target(None, relaxed=True)] * min(relax, count)  # a retarget's replacement: anywhere
        return unconstrained + [Target(tuple(sorted(a))) if a is not None else Target(roomy or None, relaxed=True)
                                for a in chosen]

    def plan_move(self, placed: Iterable[str], room: Mapping[str, int]) -> Optional[Move]:
        """The next move toward the cap, or None when the cap holds or no value under it has room."""
        counts = Counter(placed)
        over = [v for v, n in counts.items() if n > self.cap]
        to = tuple(sorted(v for v, slots in room.items() if slots > 0 and counts[v] + 1 <= self.cap))
        if not over or not to:
            return None
        return Move(to=to, away_from=max(over, key=lambda v: (counts[v], v)))

    def choose_leaver(self, placed: Mapping[str, str], in_world: Iterable[str], leader: Optional[str]) -> Optional[str]:
        """A world member on the most over-share value to ask to leave (a follower before the leader)."""
        counts = Counter(placed.values())
        over = [v for v, n in counts.items() if n > self.cap]
        if not over:
            return None
        value = max(over, key=lambda v: (counts[v], v))
        members = sorted(m for m in in_world if placed.get(m) == value)
        members.sort(key=lambda m: m == leader)
        return members[0] if members else None
