"""Terms, leases and membership on a KVStore, with fencing by term.

Key layout (one namespace per run):
  member/<id>            Member registration
  hb/<id>                last heartbeat: a sequence number and training progress (no clock)
  dead/<id>, left/<id>   the driver saw the process die / the member left cleanly
  leader/<term>          the term's leader, claimed create-if-absent
  join/<term>/<id>       a member's bid to be in the term's world
  world/<term>           the published WorldPlan
  outcome                'done' or 'failed:<reason>', ends every member's loop
"""

from __future__ import annotations

import json
import time
from typing import Optional

from elastictrain.election.heartbeat import Beat, BeatWatch
from elastictrain.election.store import KVStore
from elastictrain.election.policy import is_live
from elastictrain.election.term import Liveness, Member, WorldPlan
from elastictrain.errors import StaleTerm


def _term_key(term: int) -> str:
    return f"{term:012d}"


class Election:
    """Store-backed operations of the election; every decision lives in `term`."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.watch = BeatWatch()  # this process's view of everyone's beats, on its own monotonic clock
        self._seq = 0

    # --- membership ---------------------------------------------------------

    def register(self, member: Member) -> None:
        self.store.put(f"member/{member.id}", member.to_json())
        self.heartbeat(member.id)

    def heartbeat(self, member_id: str, beat: Optional[Beat] = None) -> None:
        """Write a beat (by default a bare one with the next sequence number: every beat must differ)."""
        if beat is None:
            self._seq += 1
            beat = Beat(seq=self._seq)
        self.store.put(f"hb/{member_id}", beat.to_bytes())

    def mark_dead(self, member_id: str) -> None:
        """Record a death (the driver is the only writer) where every member can read it cheaply."""
        self.store.put(f"dead/{member_id}", b"1")
        deaths = self.deaths() | {member_id}
        self.store.put("deaths", json.dumps(sorted(deaths)).encode())

    def deaths(self) -> set[str]:
        """Every member the driver saw die; one read, for each heartbeat."""
        raw = self.store.get("deaths")
        return set(json.loads(raw)) if raw is not None else set()

    def mark_left(self, member_id: str) -> None:
        self.store.put(f"left/{member_id}", b"1")

    def members(self) -> list[Member]:
        out = []
        for key in self.store.keys("member/"):
            raw = self.store.get(key)
            if raw is not None:
                out.append(Member.from_json(raw))
        return out

    def liveness(self, member_id: str, now: Optional[float] = None) -> Liveness:
        """Read a member's beat and note, on this process's monotonic clock (or `now`), whether it changed."""
        seen = self.watch.observe(member_id, self.store.get(f"hb/{member_id}"), time.monotonic() if now is None else now)
        return Liveness(
            heartbeat=seen.beat_at if seen is not None else None,
            dead=self.store.get(f"dead/{member_id}") is not None,
            left=self.store.get(f"left/{member_id}") is not None,
            seen=seen,
        )

    def live_ids(self, heartbeat_timeout: float, now: Optional[float] = None) -> set[str]:
        now = time.monotonic() if now is None else now
        return {m.id for m in self.members() if is_live(self.liveness(m.id, now), now, heartbeat_timeout)}

    # --- terms --------------------------------------------------------------

    def newest_term(self) -> int:
        """The highest term anyone claimed; 0 before the first election."""
        terms = [int(k.split("/", 1)[1]) for k in self.store.keys("leader/")]
        return max(terms, default=0)

    def claim(self, term: int, member_id: str) -> bool:
        """Try to lead `term`; exactly one caller per term gets True."""
        return self.store.put_if_absent(f"leader/{_term_key(term)}", member_id.encode())

    def leader_of(self, term: int) -> Optional[str]:
        raw = self.store.get(f"leader/{_term_key(term)}")
        return raw.decode() if raw is not None else None

    def join(self, term: int, member: Member) -> None:
        self.store.put(f"join/{_term_key(term)}/{member.id}", member.to_json())

    def joined(self, term: int) -> list[Member]:
        out = []
        for key in self.store.keys(f"join/{_term_key(term)}/"):
            raw = self.store.get(key)
            if raw is not None:
                out.append(Member.from_json(raw))
        return out

    def is_current(self, term: int) -> bool:
        """Fence: True while no newer term has been claimed."""
        return self.newest_term() <= term

    def publish(self, plan: WorldPlan, member_id: str) -> None:
        """Publish the world of `plan.term`; refused for a stale or foreign leader.

        Raises:
            StaleTerm: a newer term exists, or `member_id` does not lead `plan.term`.
        """
        newest = self.newest_term()
        if newest > plan.term:
            raise StaleTerm(plan.term, newest, "world publication")
        if self.leader_of(plan.term) != member_id or plan.leader != member_id:
            raise StaleTerm(plan.term, newest, f"world publication by non-leader {member_id}")
        if not self.store.put_if_absent(f"world/{_term_key(plan.term)}", plan.to_json()):
            raise StaleTerm(plan.term, newest, "second world publication")
        newest = self.newest_term()  # a newer term claimed between the check and the write: this world is stale
        if newest > plan.term:
            raise StaleTerm(plan.term, newest, "world publication (a newer term was claimed meanwhile)")

    def world(self, term: int) -> Optional[WorldPlan]:
        raw = self.store.get(f"world/{_term_key(term)}")
        return WorldPlan.from_json(raw) if raw is not None else None

    # --- run outcome ----------------------------------------------------------

    def set_outcome(self, outcome: str, detail: Optional[str] = None) -> None:
        """End the run (the first outcome wins); `detail`, say a worker's traceback, goes with a failure."""
        if detail is not None:
            self.store.put_if_absent("outcome-detail", detail.encode())
        self.store.put_if_absent("outcome", outcome.encode())

    def outcome_detail(self) -> Optional[str]:
        raw = self.store.get("outcome-detail")
        return raw.decode(errors="replace") if raw is not None else None

    def outcome(self) -> Optional[str]:
        raw = self.store.get("outcome")
        return raw.decode() if raw is not None else None
