"""Pure election decisions: who is alive, who should lead, which ranks the next world gets, when to publish.

Values in, values out: no store, no Ray, no torch. `election.Election` and the runtime act on what
these functions decide; the data they decide over (`Member`, `WorldPlan`, `Liveness`) is in
`election.term`, and the named groups of a world in `election.topology`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from elastictrain.election.term import Liveness, Member, WorldPlan


def is_live(liveness: Liveness, now: float, heartbeat_timeout: float) -> bool:
    """A member is live while its process is not known dead and its heartbeat is fresh (`now` on the
    same monotonic clock that noted the beat)."""
    if liveness.dead or liveness.left or liveness.heartbeat is None:
        return False
    return now - liveness.heartbeat <= heartbeat_timeout


def preference_key(member: Member) -> tuple:
    """Sort key: the newest committed step first, then the oldest member, then the id."""
    return (-member.committed_step, member.joined_at, member.id)


def leader_preference(members: Iterable[Member]) -> list[str]:
    """Member ids in the order they should lead: best candidate first."""
    return [m.id for m in sorted(members, key=preference_key)]


def assign_ranks(
    term: int,
    leader: str,
    joined: Iterable[Member],
    *,
    max_workers: int,
    host: str,
    port: int,
    now: float = 0.0,
    detected_at: Optional[float] = None,
) -> WorldPlan:
    """Assign ranks for a term from the members that joined it.

    Members holding the newest state come first (rank 0 is the broadcast source);
    beyond `max_workers`, the members least preferred are left out and wait.
    """
    ranked = sorted(joined, key=preference_key)
    if leader not in {m.id for m in ranked}:
        raise ValueError(f"term {term}: leader {leader} is not among the members that joined")
    # The leader always belongs to its own world; the least preferred others wait outside.
    others = [m.id for m in ranked if m.id != leader][: max_workers - 1]
    kept = {leader, *others}
    ordered = [m for m in ranked if m.id in kept]
    return WorldPlan(
        term=term,
        leader=leader,
        members=tuple(m.id for m in ordered),
        steps=tuple(m.committed_step for m in ordered),
        labels=tuple(dict(m.labels) for m in ordered),
        host=host,
        port=port,
        published_at=now,
        detected_at=detected_at,
    )


@dataclass(frozen=True)
class GatherDecision:
    """What a leader does next while members join its term."""

    publish: bool
    give_up: bool = False
    reason: str = ""


def decide_gather(
    *,
    joined: set[str],
    live: set[str],
    min_workers: int,
    max_workers: int,
    now: float,
    started_at: float,
    rendezvous_timeout: float,
    below_min_timeout: float,
    startup_wait: float = 0.0,
) -> GatherDecision:
    """Publish once every live member has joined (or the wait for stragglers ran out).

    Below `min_workers` the leader keeps waiting for capacity, up to `below_min_timeout`.
    The first world also waits up to `startup_wait` for `max_workers`, since workers
    that were started together are still coming up.
    """
    joined_live = joined & live
    full = len(joined_live) >= max_workers
    if not full and now - started_at < startup_wait:
        return GatherDecision(publish=False)
    everyone_in = live <= joined or full
    timed_out = now - started_at >= rendezvous_timeout
    if len(joined_live) >= min_workers and (everyone_in or timed_out):
        return GatherDecision(publish=True, reason="all live members joined" if everyone_in else "stragglers left out")
    if len(joined_live) < min_workers and now - started_at >= below_min_timeout:
        return GatherDecision(
            publish=False,
            give_up=True,
            reason=f"{len(joined_live)} live worker(s) for {below_min_timeout:.0f}s, fewer than min_workers={min_workers}",
        )
    return GatherDecision(publish=False)


def should_grow(world: WorldPlan, waiting_live: set[str], max_workers: int) -> bool:
    """A leader rebuilds at a step boundary when live members wait outside and there is room."""
    return bool(waiting_live) and world.world_size < max_workers

