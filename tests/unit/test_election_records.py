"""Election records on an in-memory store: each kind authenticated and validated; garbage, forged
and moved records are skipped with one `record_rejected` event, never an exception."""

from __future__ import annotations

import json
import threading
import time

import pytest

from elastictrain.election.election import Election
from elastictrain.election.heartbeat import Beat
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import NO_STATE, Member, WorldPlan
from elastictrain.events import check
from elastictrain.runtime.rendezvous import Rendezvous, RendezvousPolicy
from elastictrain.secret import RunSecret

GARBAGE = [b"\xff\x00not json", b"{}", b"", b"et1:" + b"\x00" * 32 + b"{}"]
"""Values a stranger can write without the secret: unparsable bytes, an empty object, a zero MAC."""


class Run:
    """The driver's and one worker's views of one run's store: one secret, two Election objects."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.secret = RunSecret.generate()
        self.events: list[dict] = []
        self.election = self.view()

    def view(self) -> Election:
        return Election(self.store, self.secret, scope="run-ns", on_reject=self.events.append)

    def rejected(self) -> list[str]:
        for e in self.events:
            check(e)
        return [e["key"] for e in self.events if e["kind"] == "record_rejected"]


def _plan(term: int, leader: str, members=("a", "b"), steps=(3, 3)) -> WorldPlan:
    return WorldPlan(term=term, leader=leader, members=tuple(members), steps=tuple(steps), host="127.0.0.1", port=1)


@pytest.mark.parametrize("value", GARBAGE)
def test_a_forged_member_record_is_skipped_not_raised(value):
    run = Run()
    run.election.register(Member("a", joined_at=0.0))
    run.store.put("member/evil", value)
    assert [m.id for m in run.election.members()] == ["a"]
    assert run.rejected() == ["member/evil"]


def test_a_sealed_member_record_that_does_not_parse_or_names_another_member_is_skipped():
    run = Run()
    e = run.election
    e.register(Member("a", joined_at=0.0))
    run.store.put("member/bad", e._seal("member/bad", b"{}"))  # sealed by a member of the run, but no member
    run.store.put("member/c", run.store.get("member/a"))  # a genuine record moved under another key
    e._put("member/d", Member("a", joined_at=0.0).to_json())  # sealed under d's key, but says it is a
    assert [m.id for m in e.members()] == ["a"]
    assert sorted(run.rejected()) == ["member/bad", "member/c", "member/d"]


def test_each_rejection_is_reported_once_per_key_and_reason():
    run = Run()
    run.store.put("member/evil", b"{}")
    for _ in range(5):
        run.election.members()
    assert run.rejected() == ["member/evil"]
    run.store.put("member/evil", run.election._seal("member/evil", b"[]"))  # another reason: reported again
    run.election.members()
    assert run.rejected() == ["member/evil", "member/evil"]


def test_a_record_of_another_run_with_the_same_secret_does_not_open():
    run = Run()
    other = Election(run.store, run.secret, scope="another-run")
    other.claim(7, "x")
    assert run.election.newest_term() == 0 and run.rejected() == ["leader/000000000007"]


@pytest.mark.parametrize("value", GARBAGE + [b"1"])
def test_a_far_future_leader_record_neither_advances_the_term_nor_fences(value):
    run = Run()
    e = run.election
    assert e.claim(1, "a")
    run.store.put("leader/999999999999", value)
    run.store.put("leader/junk", value)
    assert e.newest_term() == 1 and e.is_current(1) and e.leader_of(999999999999) is None
    assert set(run.rejected()) == {"leader/999999999999", "leader/junk"}


def test_a_genuine_leader_record_moved_to_the_next_term_is_no_claim():
    run = Run()
    e = run.election
    assert e.claim(1, "a")
    run.store.put("leader/000000000002", run.store.get("leader/000000000001"))
    assert e.newest_term() == 1 and e.leader_of(2) is None
    assert not e.claim(2, "b")  # the key is taken: nobody can lead term 2 (the rendezvous moves to 3)
    assert e.claim(3, "b") and e.newest_term() == 3


def test_a_forged_or_moved_world_is_no_world():
    run = Run()
    e = run.election
    assert e.claim(1, "a")
    e.publish(_plan(1, "a"), "a")
    assert e.claim(2, "a")
    run.store.put("world/000000000002", run.store.get("world/000000000001"))
    assert e.world(2) is None
    run.store.put("world/000000000003", _plan(3, "a").to_json())
    assert e.world(3) is None and e.world(1) == _plan(1, "a")
    assert set(run.rejected()) == {"world/000000000002", "world/000000000003"}


def test_a_world_that_names_another_leader_than_the_terms_record_is_no_world():
    run = Run()
    e = run.election
    assert e.claim(1, "a")
    e._put("world/000000000001", _plan(1, "b").to_json())
    assert e.world(1) is None and run.rejected() == ["world/000000000001"]


def test_a_forged_world_squatting_the_key_makes_the_publication_stale():
    from elastictrain.errors import StaleTerm

    run = Run()
    e = run.election
    assert e.claim(1, "a")
    run.store.put("world/000000000001", b"{}")
    with pytest.raises(StaleTerm, match="forged"):
        e.publish(_plan(1, "a"), "a")


@pytest.mark.parametrize("value", GARBAGE + [b"done"])
def test_a_forged_outcome_does_not_end_the_run_and_the_real_one_replaces_it(value):
    run = Run()
    run.store.put("outcome", value)
    run.store.put("outcome-detail", value)
    assert run.election.outcome() is None and run.election.outcome_detail() is None
    run.election.set_outcome("failed:boom", detail="trace")
    assert run.election.outcome() == "failed:boom" and run.election.outcome_detail() == "trace"
    run.election.set_outcome("done")  # the first genuine outcome wins
    assert run.election.outcome() == "failed:boom"


def test_an_outcome_sealed_by_the_run_but_malformed_is_skipped():
    run = Run()
    run.election._put("outcome", b"whatever")
    assert run.election.outcome() is None and run.rejected() == ["outcome"]


def test_forged_deaths_dead_and_left_marks_count_for_nothing():
    run = Run()
    e = run.election
    e.register(Member("a", joined_at=0.0))
    run.store.put("deaths", json.dumps(["a"]).encode())
    run.store.put("dead/a", b"1")
    run.store.put("left/a", b"1")
    assert e.deaths() == set()
    live = e.liveness("a", now=0.0)
    assert not live.dead and not live.left and live.heartbeat is not None
    e.mark_dead("b")  # the driver's real mark replaces the forged list
    assert e.deaths() == {"b"}
    assert {"deaths", "dead/a", "left/a"} <= set(run.rejected())


def test_a_moved_death_mark_does_not_kill_another_member():
    run = Run()
    e = run.election
    e.mark_dead("x")
    run.store.put("dead/a", run.store.get("dead/x"))
    assert not e.liveness("a", now=0.0).dead and e.liveness("x", now=0.0).dead


def test_a_forged_beat_neither_revives_nor_silences_a_member():
    run = Run()
    driver, worker = run.view(), run.view()
    worker.register(Member("a", joined_at=0.0))
    first = driver.liveness("a", now=0.0)
    run.store.put("hb/a", Beat(seq=99, progress=5).to_bytes())  # unsealed: no new beat
    assert driver.liveness("a", now=10.0).heartbeat == first.heartbeat == 0.0
    worker.heartbeat("a", Beat(seq=2, progress=1))
    assert driver.liveness("a", now=11.0).heartbeat == 11.0
    run.store.put("hb/a", b"{}")
    assert driver.liveness("a", now=12.0).heartbeat == 11.0  # the last genuine beat still stands
    assert "hb/a" in run.rejected()


def test_a_forged_leave_mark_is_ignored_and_cannot_block_the_real_one():
    run = Run()
    e = run.election
    run.store.put("leave/a", b"drain")
    assert not e.asked_to_leave("a")
    assert e.ask_to_leave("a") and e.asked_to_leave("a")
    assert not e.ask_to_leave("a")  # once


def test_a_forged_backing_is_no_backing():
    run = Run()
    run.store.put("commits", b"999999")
    assert run.election.backed_step() == NO_STATE
    run.election.back_step(12)
    assert run.election.backed_step() == 12


@pytest.mark.parametrize("value", GARBAGE)
def test_a_forged_bid_is_not_a_member_of_the_term(value):
    run = Run()
    e = run.election
    e.join(1, Member("a", joined_at=0.0, committed_step=3))
    run.store.put("join/000000000001/evil", value)
    assert [m.id for m in e.joined(1)] == ["a"]


# --- the rendezvous on such a store -------------------------------------------------------------------

POLICY = RendezvousPolicy(min_workers=2, max_workers=4, heartbeat_timeout_s=2.0, rendezvous_timeout_s=1.0,
                          below_min_timeout_s=3.0, check_bids=True)


def _race(run: Run, members, policy=POLICY, timeout=20.0, **kwargs) -> dict:
    results, errors = {}, []

    def go(member):
        try:
            rdv = Rendezvous(run.view(), member.id, policy, open_store=lambda: ("127.0.0.1", 1234, None))
            results[member.id] = rdv.next_world(member, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for m in members:
        run.election.register(m)
    # daemon: a rendezvous that never ends fails this test instead of hanging the suite
    threads = [threading.Thread(target=go, args=(m,), daemon=True) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "the rendezvous did not end"
    assert not errors, errors
    return results


def test_garbage_leader_world_and_outcome_records_do_not_stop_an_election():
    run = Run()
    for key in ("leader/999999999999", "leader/000000000001", "world/000000000002", "outcome", "member/evil",
                "join/000000000001/evil"):
        run.store.put(key, b"{}")
    worlds = _race(run, [Member("a", 0.0), Member("b", 1.0)], last_term=0, was_member=False)
    plan = next(iter(worlds.values()))
    assert set(worlds) == {"a", "b"} and set(plan.members) == {"a", "b"}
    assert plan.term == 3  # term 1's leader key and term 2's world key are held by forgeries: skipped


def test_a_follower_stops_waiting_for_a_leader_that_never_publishes():
    run = Run()
    ghost = run.view()
    ghost.register(Member("ghost", joined_at=0.0))
    assert ghost.claim(1, "ghost")  # a genuine member claims term 1, beats, and never publishes
    stop = threading.Event()

    def beat():
        seq = 0
        while not stop.wait(0.05):
            seq += 1
            ghost.heartbeat("ghost", Beat(seq=seq))

    beats = threading.Thread(target=beat)
    beats.start()
    try:
        started = time.monotonic()
        worlds = _race(run, [Member("a", 1.0), Member("b", 2.0)], last_term=0, was_member=False)
    finally:
        stop.set()
        beats.join()
    plan = next(iter(worlds.values()))
    assert plan.term == 2 and set(plan.members) == {"a", "b"}
    bound = POLICY.rendezvous_timeout_s + POLICY.startup_wait_s + POLICY.below_min_timeout_s + 2 * POLICY.heartbeat_timeout_s
    assert time.monotonic() - started < bound


def test_an_inflated_bid_nobody_backs_does_not_become_rank_zero():
    run = Run()
    run.election.back_step(5)  # the newest commit the driver heard of
    liar = Member("liar", 2.0, committed_step=10**9)
    run.election.register(liar)
    run.election.join(1, liar)  # a bid sealed with the secret (the worst case), claiming a step nobody saw
    members = [Member("a", 0.0, committed_step=5), Member("b", 1.0, committed_step=4)]
    worlds = _race(run, members, last_term=0, was_member=True)
    plan = worlds["a"]
    assert plan.members[0] == "a" and plan.source_step == 5 and "liar" not in plan.members
    assert "join/000000000001/liar" in run.rejected()


def test_a_genuine_survivor_ahead_of_the_driver_becomes_rank_zero_once_backed():
    run = Run()
    run.election.back_step(4)  # the driver has not yet heard of "ahead"'s step 5

    def driver_hears_later():
        time.sleep(0.3)  # the survivor's report reaches the driver after its bid
        run.election.back_step(5)

    late = threading.Thread(target=driver_hears_later)
    late.start()
    try:
        members = [Member("behind", 0.0, committed_step=4), Member("ahead", 1.0, committed_step=5)]
        worlds = _race(run, members, last_term=0, was_member=True)
    finally:
        late.join()
    plan = next(iter(worlds.values()))
    assert plan.members[0] == "ahead" and plan.source_step == 5 and set(plan.members) == {"ahead", "behind"}
    assert not [k for k in run.rejected() if k.startswith("join/")]
