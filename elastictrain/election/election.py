"""Terms, leases and membership on a KVStore, with fencing by term.

Key layout (one namespace per run):
  member/<id>            Member registration
  hb/<id>                last heartbeat: a sequence number and training progress (no clock)
  dead/<id>, left/<id>   the driver saw the process die / the member left cleanly
  deaths                 every member the driver saw die (one read per heartbeat)
  leave/<id>             the driver asks a member to leave (its node drains)
  leader/<term>          the term's leader, claimed create-if-absent
  join/<term>/<id>       a member's bid to be in the term's world
  world/<term>           the published WorldPlan
  commits                the newest committed step the driver has heard of (what backs a bid)
  outcome                'done' or 'failed:<reason>', ends every member's loop

Every record is sealed (`election.records`): a MAC under the run secret binds the run's scope,
the key and the value. A value that does not open or parse is skipped, reported once per key and
reason through `on_reject`, and never raises out of a read.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Optional

from elastictrain.election.heartbeat import Beat, BeatWatch
from elastictrain.election.policy import is_live
from elastictrain.election.records import RecordRejected, mac_key, open_record, seal_record
from elastictrain.election.store import KVStore
from elastictrain.election.term import NO_STATE, Liveness, Member, WorldPlan
from elastictrain.errors import StaleTerm
from elastictrain.events import Event, event
from elastictrain.secret import RunSecret

MAX_DEATHS = 100_000


def _term_key(term: int) -> str:
    return f"{term:012d}"


def _term_of(key: str) -> Optional[int]:
    tail = key.split("/", 1)[1]
    return int(tail) if len(tail) == 12 and tail.isdigit() else None


class Election:
    """Store-backed operations of the election; every decision lives in `policy`.

    Args:
        store: the run's key-value store.
        secret: the run secret (`RunSpec.secret`: the same on the driver and every worker); a fresh one
            when omitted, for a store only this object uses (tests).
        scope: bound into every record's MAC (the run's store namespace): no record moves between runs.
        on_reject: called with a `record_rejected` event, once per key and reason, for a value that does
            not open or parse.
    """

    def __init__(self, store: KVStore, secret: Optional[RunSecret] = None, *, scope: str = "",
                 on_reject: Optional[Callable[[Event], None]] = None) -> None:
        self.store = store
        self.secret = secret if secret is not None else RunSecret.generate()
        self.scope = scope
        self.on_reject = on_reject
        self.watch = BeatWatch()  # this process's view of everyone's beats, on its own monotonic clock
        self._seq = 0
        self._rejected: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._leaders: dict[str, bool] = {}  # leader key -> verified (claimed once, never rewritten)
        self._beats: dict[str, bytes] = {}  # member -> its last beat that verified
        self._key: Optional[bytes] = None

    @property
    def _mac_key(self) -> bytes:
        if self._key is None:  # resolved on first use: a spec-named secret is read on the machine that uses it
            self._key = mac_key(self.secret)
        return self._key

    # --- sealed records -------------------------------------------------------

    def _seal(self, key: str, payload: bytes) -> bytes:
        return seal_record(self._mac_key, self.scope, key, payload)

    def _put(self, key: str, payload: bytes) -> None:
        self.store.put(key, self._seal(key, payload))

    def _put_if_absent(self, key: str, payload: bytes, *, replace_forged: bool = False) -> bool:
        """Create-if-absent; with `replace_forged`, a value there that does not verify is overwritten
        (for keys with one writer, so that a planted value cannot block the real one)."""
        if self.store.put_if_absent(key, self._seal(key, payload)):
            return True
        if replace_forged and self._get(key) is None and self.store.get(key) is not None:
            self._put(key, payload)
            return True
        return False

    def _get(self, key: str) -> Optional[bytes]:
        """The verified payload under `key`; None when absent or rejected (reported)."""
        raw = self.store.get(key)
        if raw is None:
            return None
        try:
            return open_record(self._mac_key, self.scope, key, raw)
        except RecordRejected as exc:
            self.reject(key, exc.reason)
            return None

    def _parsed(self, key: str, parse: Callable[[bytes], object]):
        payload = self._get(key)
        if payload is None:
            return None
        try:
            return parse(payload)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            self.reject(key, f"does not parse: {str(exc)[:200]}")
            return None

    def reject(self, key: str, reason: str) -> None:
        """Report a record that was not believed (once per key and reason)."""
        with self._lock:
            if (key, reason) in self._rejected:
                return
            self._rejected.add((key, reason))
        if self.on_reject is not None:
            try:
                self.on_reject(event("record_rejected", key=key[:300], reason=reason))
            except Exception:  # noqa: BLE001 - a report that cannot be sent must not stop the reader
                pass

    # --- membership ---------------------------------------------------------

    def register(self, member: Member) -> None:
        self._put(f"member/{member.id}", member.to_json())
        self.heartbeat(member.id)

    def heartbeat(self, member_id: str, beat: Optional[Beat] = None) -> None:
        """Write a beat (by default a bare one with the next sequence number: every beat must differ)."""
        if beat is None:
            self._seq += 1
            beat = Beat(seq=self._seq)
        self._put(f"hb/{member_id}", beat.to_bytes())

    def mark_dead(self, member_id: str) -> None:
        """Record a death (the driver is the only writer) where every member can read it cheaply."""
        self._put(f"dead/{member_id}", b"1")
        deaths = self.deaths() | {member_id}
        self._put("deaths", json.dumps(sorted(deaths)).encode())

    def deaths(self) -> set[str]:
        """Every member the driver saw die; one read, for each heartbeat."""
        found = self._parsed("deaths", _parse_deaths)
        return found if found is not None else set()

    def mark_left(self, member_id: str) -> None:
        self._put(f"left/{member_id}", b"1")

    def ask_to_leave(self, member_id: str, reason: str = "drain") -> bool:
        """Ask a member to leave at its next step boundary (the driver only); True the first time."""
        return self._put_if_absent(f"leave/{member_id}", reason.encode(), replace_forged=True)

    def asked_to_leave(self, member_id: str) -> bool:
        return self._get(f"leave/{member_id}") is not None

    def members(self) -> list[Member]:
        return self._members_under("member/")

    def _members_under(self, prefix: str) -> list[Member]:
        """The verified member records under `prefix` whose member id is the last part of their key."""
        out = []
        for key in self.store.keys(prefix):
            member = self._parsed(key, Member.from_json)
            if member is None:
                continue
            if member.id != key[len(prefix):]:
                self.reject(key, f"names member {member.id[:100]!r}, not the one of its key")
                continue
            out.append(member)
        return out

    def _beat(self, member_id: str) -> Optional[bytes]:
        """The member's beat as last written by the run: a value that does not verify changes nothing."""
        key = f"hb/{member_id}"
        raw = self.store.get(key)
        if raw is not None:
            try:
                self._beats[member_id] = open_record(self._mac_key, self.scope, key, raw)
            except RecordRejected as exc:
                self.reject(key, exc.reason)
        return self._beats.get(member_id)

    def liveness(self, member_id: str, now: Optional[float] = None) -> Liveness:
        """Read a member's beat and note, on this process's monotonic clock (or `now`), whether it changed."""
        seen = self.watch.observe(member_id, self._beat(member_id), time.monotonic() if now is None else now)
        return Liveness(
            heartbeat=seen.beat_at if seen is not None else None,
            dead=self._get(f"dead/{member_id}") is not None,
            left=self._get(f"left/{member_id}") is not None,
            seen=seen,
        )

    def live_ids(self, heartbeat_timeout: float, now: Optional[float] = None) -> set[str]:
        now = time.monotonic() if now is None else now
        return {m.id for m in self.members() if is_live(self.liveness(m.id, now), now, heartbeat_timeout)}

    # --- terms --------------------------------------------------------------

    def newest_term(self) -> int:
        """The highest term anyone claimed; 0 before the first election."""
        """The highest term claimed by a record that verifies; 0 before the first election."""
        keyed = []
        for key in self.store.keys("leader/"):
            term = _term_of(key)
            if term is None:
                self.reject(key, "not a term number")
            else:
                keyed.append((term, key))
        for term, key in sorted(keyed, reverse=True):
            valid = self._leaders.get(key)
            if valid is None:
                # a leader key is claimed once and never rewritten: what it held when read decides for good
                valid = self._leaders[key] = self.leader_of(term) is not None
            if valid:
                return term
        return 0

    def claim(self, term: int, member_id: str) -> bool:
        """Try to lead `term`; exactly one caller per term gets True."""
        return self._put_if_absent(f"leader/{_term_key(term)}", member_id.encode())

    def leader_of(self, term: int) -> Optional[str]:
        """The member that claimed `term`; None when unclaimed or its record does not verify."""
        return self._parsed(f"leader/{_term_key(term)}", _parse_name)

    def join(self, term: int, member: Member) -> None:
        self._put(f"join/{_term_key(term)}/{member.id}", member.to_json())

    def joined(self, term: int) -> list[Member]:
        return self._members_under(f"join/{_term_key(term)}/")

    def back_step(self, step: int) -> None:
        """Publish the newest committed step the driver has heard of (the driver only)."""
        self._put("commits", json.dumps(int(step)).encode())

    def backed_step(self) -> int:
        """The newest committed step the driver published; NO_STATE before any."""
        step = self._parsed("commits", _parse_step)
        return step if step is not None else NO_STATE

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
        if not self._put_if_absent(f"world/{_term_key(plan.term)}", plan.to_json()):
            why = "second world publication" if self.world(plan.term) is not None else "a forged world record holds the key"
            raise StaleTerm(plan.term, newest, why)
        newest = self.newest_term()  # a newer term claimed between the check and the write: this world is stale
        if newest > plan.term:
            raise StaleTerm(plan.term, newest, "world publication (a newer term was claimed meanwhile)")

    def world(self, term: int) -> Optional[WorldPlan]:
        """The published world of `term`; None when unpublished or its record does not verify or fit."""
        key = f"world/{_term_key(term)}"
        plan = self._parsed(key, WorldPlan.from_json)
        if plan is None:
            return None
        if plan.term != term or plan.leader not in plan.members or plan.leader != self.leader_of(term):
            self.reject(key, "a world whose term or leader disagrees with its key and the term's leader record")
            return None
        return plan

    # --- run outcome ----------------------------------------------------------

    def set_outcome(self, outcome: str, detail: Optional[str] = None) -> None:
        """End the run (the first outcome wins); `detail`, say a worker's traceback, goes with a failure."""
        if detail is not None:
            self._put_if_absent("outcome-detail", detail.encode(), replace_forged=True)
        self._put_if_absent("outcome", outcome.encode(), replace_forged=True)

    def outcome_detail(self) -> Optional[str]:
        raw = self._get("outcome-detail")
        return raw.decode(errors="replace") if raw is not None else None

    def outcome(self) -> Optional[str]:
        """'done' or 'failed:<reason>' once a member or the driver ended the run; None before."""
        return self._parsed("outcome", _parse_outcome)


def _parse_name(raw: bytes) -> str:
    name = raw.decode()
    if not 0 < len(name) <= 256:
        raise ValueError("not a member id")
    return name


def _parse_step(raw: bytes) -> int:
    step = json.loads(raw)
    if not isinstance(step, int) or isinstance(step, bool) or step < NO_STATE:
        raise ValueError("not a step")
    return step


def _parse_deaths(raw: bytes) -> set[str]:
    ids = json.loads(raw)
    if not isinstance(ids, list) or len(ids) > MAX_DEATHS or not all(isinstance(i, str) for i in ids):
        raise ValueError("not a list of member ids")
    return set(ids)


def _parse_outcome(raw: bytes) -> str:
    outcome = raw.decode()
    if outcome != "done" and not outcome.startswith("failed:"):
        raise ValueError("neither 'done' nor 'failed:<reason>'")
    return outcome
