"""How a member gets into the next world: join a claimed term, or claim and lead one.

Runs on every worker between two entries of `train_fn`. Safety rests on the
store's create-if-absent (one leader per term) and on `Election.publish`'s fence
(no world from a stale term); timing only decides who usually wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from elastictrain.election.election import Election
from elastictrain.election.policy import assign_ranks, decide_gather, is_live
from elastictrain.election.term import Member, WorldPlan
from elastictrain.errors import StaleTerm, TooFewWorkers


class RunEnded(Exception):
    """The run's outcome was set (done or failed) while this member waited."""

    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(frozen=True)
class RendezvousPolicy:
    min_workers: int
    max_workers: int
    heartbeat_timeout_s: float
    rendezvous_timeout_s: float
    below_min_timeout_s: float
    startup_wait_s: float = 0.0
    poll_s: float = 0.01
    claim_stagger_s: float = 0.02
    no_state_delay_s: float = 0.2
    check_bids: bool = False
    """Count a bid above the leader's own step only once the driver backs it (`Election.backed_step`)."""


class Rendezvous:
    """One member's side of the election.

    Args:
        election: the run's store-backed election.
        member_id: this member.
        policy: sizes and timeouts.
        open_store: starts this term's rendezvous store when leading; returns (host, port, handle).
    """

    def __init__(
        self,
        election: Election,
        member_id: str,
        policy: RendezvousPolicy,
        open_store: Callable[[], tuple[str, int, object]],
    ) -> None:
        self.election = election
        self.member_id = member_id
        self.policy = policy
        self.open_store = open_store
        self.store_handle: Optional[object] = None
        self.spare_since: Optional[float] = None
        """Wall time this member was first left out of a full world and waited as a warm spare (None: never)."""

    def leader_alive(self, term: int) -> bool:
        """Whether `term` has a leader whose heartbeat is current (this member counts as alive)."""
        leader = self.election.leader_of(term)
        if leader is None:
            return False
        if leader == self.member_id:
            return True
        now = time.monotonic()
        return is_live(self.election.liveness(leader, now), now, self.policy.heartbeat_timeout_s)

    def next_world(self, me: Member, *, last_term: int, was_member: bool, last_rank: int = 0) -> WorldPlan:
        """Block until a world that includes `me` is published; lead one if need be.

        Args:
            me: this member, with its committed step and failure-detection time.
            last_term: the term of the last world this member saw (0: none yet).
            was_member: whether `me` was in that world (a survivor is a candidate at once).
            last_rank: its rank there; lower ranks claim a little earlier.

        Raises:
            RunEnded: the run finished or failed meanwhile.
            TooFewWorkers: this member led and too few workers came for too long.
        """
        target = last_term + 1
        candidate = was_member or last_term == 0
        joined_term = 0
        waiting_since = time.monotonic()
        unpublished: tuple[int, float] = (0, 0.0)  # a term seen claimed without a world, and since when
        while True:
            outcome = self.election.outcome()
            if outcome is not None:
                raise RunEnded(outcome)
            newest = self.election.newest_term()
            if newest >= target:
                target = newest
                if joined_term != newest:
                    self.election.join(newest, me)
                    joined_term = newest
                world = self.election.world(newest)
                if world is not None:
                    if world.rank_of(self.member_id) is not None:
                        return world
                    # Left out (late, or beyond max_workers): wait for the leader to grow the world.
                    target, candidate = newest + 1, False
                    if world.world_size >= self.policy.max_workers and self.spare_since is None:
                        self.spare_since = time.time()  # a warm spare: it joins the next rebuild
                elif not self.leader_alive(newest) or self._waited_out(newest, unpublished):
                    target, candidate = newest + 1, True
                    waiting_since = time.monotonic()
                elif unpublished[0] != newest:
                    unpublished = (newest, time.monotonic())
            else:
                if not candidate and (newest == 0 or not self.leader_alive(newest)):
                    candidate, waiting_since = True, time.monotonic()
                if candidate:
                    delay = last_rank * self.policy.claim_stagger_s
                    if me.committed_step < 0:
                        delay += self.policy.no_state_delay_s
                    if time.monotonic() - waiting_since >= delay:
                        if self.election.claim(target, self.member_id):
                            try:
                                return self._lead(target, me)
                            except StaleTerm:
                                newest = self.election.newest_term()
                                # a newer term: join it; this term's world key held by a forgery: lead the next
                                target = newest if newest > target else target + 1
                                continue
                        elif self.election.leader_of(target) is None:
                            target += 1  # the term's key holds a record that does not verify: nobody can lead it
            time.sleep(self.policy.poll_s)

    def _waited_out(self, term: int, unpublished: tuple[int, float]) -> bool:
        """A live leader claimed `term` and published no world for longer than a leader waits: move on.

        A leader publishes within `rendezvous_timeout_s` (plus the first world's startup wait) once
        `min_workers` live members joined; with fewer it may wait for capacity up to `below_min_timeout_s`.
        """
        seen, since = unpublished
        if seen != term:
            return False
        p = self.policy
        waited = time.monotonic() - since
        bound = p.rendezvous_timeout_s + (p.startup_wait_s if term == 1 else 0.0) + p.heartbeat_timeout_s
        if waited < bound:
            return False
        if waited >= max(bound, p.below_min_timeout_s + p.heartbeat_timeout_s):
            return True
        live = self.election.live_ids(p.heartbeat_timeout_s) | {self.member_id}
        return len({m.id for m in self.election.joined(term)} & live) >= p.min_workers

    def _backed(self, term: int, me: Member, joined: dict[str, Member]) -> dict[str, Member]:
        """The bids this leader counts: a member becomes the state source (rank 0) only on a step that the
        leader itself holds or the driver has heard committed (see `check_bids`)."""
        if not self.policy.check_bids:
            return joined
        backed = max(me.committed_step, self.election.backed_step())
        return {i: m for i, m in joined.items() if m.committed_step <= backed}

    def _lead(self, term: int, me: Member) -> WorldPlan:
        self.election.join(term, me)
        host, port, handle = self.open_store()
        self.store_handle = handle
        started = time.monotonic()
        p = self.policy
        while True:
            outcome = self.election.outcome()
            if outcome is not None:
                raise RunEnded(outcome)
            if not self.election.is_current(term):
                raise StaleTerm(term, self.election.newest_term(), "leadership")
            live = self.election.live_ids(p.heartbeat_timeout_s) | {self.member_id}
            bids = {m.id: m for m in self.election.joined(term)}
            joined = self._backed(term, me, bids)
            decision = decide_gather(
                joined=set(joined),
                live=live,
                min_workers=p.min_workers,
                max_workers=p.max_workers,
                now=time.monotonic(),
                started_at=started,
                rendezvous_timeout=p.rendezvous_timeout_s,
                below_min_timeout=p.below_min_timeout_s,
                startup_wait=p.startup_wait_s if term == 1 else 0.0,
            )
            if decision.give_up:
                self.election.set_outcome(f"failed:{decision.reason}")
                raise TooFewWorkers(decision.reason)
            if decision.publish:
                members = [joined[i] for i in joined if i in live]
                detected = [m.detected_at for m in members if m.detected_at is not None]
                plan = assign_ranks(
                    term,
                    self.member_id,
                    members,
                    max_workers=p.max_workers,
                    host=host,
                    port=port,
                    now=time.time(),
                    detected_at=min(detected) if detected else None,
                )
                self.election.publish(plan, self.member_id)
                for i in sorted(set(bids) - set(joined)):
                    self.election.reject(f"join/{term:012d}/{i}", f"bid of step {bids[i].committed_step} that neither "
                                         f"the leader nor the driver's newest commit backs; left out of the world")
                return plan
            time.sleep(p.poll_s)

