"""Election decisions and term fencing, without Ray."""

from __future__ import annotations

import threading

import pytest

from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.election.policy import assign_ranks, decide_gather, is_live, leader_preference, should_grow
from elastictrain.election.term import NO_STATE, Liveness, Member, WorldPlan
from elastictrain.errors import StaleTerm


def test_memory_store_put_if_absent_writes_once():
    store = MemoryStore()
    assert store.put_if_absent("k", b"a") is True
    assert store.put_if_absent("k", b"b") is False
    assert store.get("k") == b"a"
    store.put("k", b"c")
    assert store.get("k") == b"c"
    assert store.keys("k") == ["k"] and store.keys("x") == []
    store.delete("k")
    assert store.get("k") is None


def test_many_concurrent_candidates_one_leader_per_term():
    election = Election(MemoryStore())
    winners: dict[int, list[str]] = {t: [] for t in range(1, 21)}
    lock = threading.Lock()
    start = threading.Barrier(16)

    def candidate(i: int) -> None:
        start.wait()
        for term in range(1, 21):
            if election.claim(term, f"m{i}"):
                with lock:
                    winners[term].append(f"m{i}")

    threads = [threading.Thread(target=candidate, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(w) == 1 for w in winners.values()), winners
    assert election.newest_term() == 20
    assert election.leader_of(7) == winners[7][0]


def _plan(term: int, leader: str, members=("a", "b")) -> WorldPlan:
    return WorldPlan(term=term, leader=leader, members=tuple(members), steps=(3,) * len(members), host="h", port=1)


def test_stale_leader_publication_is_refused():
    election = Election(MemoryStore())
    assert election.claim(3, "a")
    assert election.claim(4, "b")  # a newer term appeared while "a" was slow
    with pytest.raises(StaleTerm) as err:
        election.publish(_plan(3, "a"), "a")
    assert err.value.newest == 4
    assert election.world(3) is None
    election.publish(_plan(4, "b"), "b")
    assert election.world(4).leader == "b"


def test_a_newer_term_claimed_during_the_publication_makes_it_stale():
    class ClaimDuringWrite(MemoryStore):
        def put_if_absent(self, key, value):
            written = super().put_if_absent(key, value)
            if key.startswith("world/"):  # between the leader's check and its write, "b" claims term 4
                election.claim(4, "b")
            return written

    election = Election(ClaimDuringWrite())
    assert election.claim(3, "a")
    with pytest.raises(StaleTerm, match="newer term was claimed meanwhile") as err:
        election.publish(_plan(3, "a"), "a")
    assert err.value.newest == 4


def test_publication_by_a_non_leader_or_twice_is_refused():
    election = Election(MemoryStore())
    election.claim(1, "a")
    with pytest.raises(StaleTerm):
        election.publish(_plan(1, "b"), "b")
    election.publish(_plan(1, "a"), "a")
    with pytest.raises(StaleTerm):
        election.publish(_plan(1, "a", members=("a",)), "a")
    assert election.world(1).members == ("a", "b")


def test_fence_refuses_older_terms():
    election = Election(MemoryStore())
    election.claim(5, "a")
    assert election.is_current(5) and election.is_current(6)
    election.claim(6, "b")
    assert not election.is_current(5)


def test_deaths_are_one_read():
    election = Election(MemoryStore())
    assert election.deaths() == set()
    election.mark_dead("a")
    election.mark_dead("b")
    assert election.deaths() == {"a", "b"}
    assert election.liveness("a").dead and not election.liveness("c").dead


def test_leader_preference_newest_step_then_oldest():
    members = [
        Member("young-new", joined_at=5.0, committed_step=10),
        Member("old-behind", joined_at=1.0, committed_step=9),
        Member("old-new", joined_at=2.0, committed_step=10),
        Member("fresh", joined_at=0.5, committed_step=NO_STATE),
    ]
    assert leader_preference(members) == ["old-new", "young-new", "old-behind", "fresh"]


def test_assign_ranks_puts_state_holders_first_and_keeps_the_leader():
    members = [
        Member("a", 1.0, committed_step=NO_STATE),
        Member("b", 2.0, committed_step=7),
        Member("c", 3.0, committed_step=6),
    ]
    plan = assign_ranks(4, "a", members, max_workers=2, host="h", port=9)
    assert plan.members == ("b", "a")  # c, least preferred, waits outside; the leader stays
    assert plan.source_step == 7 and plan.needs_sync and not plan.restore_from_storage
    fresh = assign_ranks(1, "a", [Member("a", 1.0), Member("b", 2.0)], max_workers=4, host="h", port=9)
    assert fresh.restore_from_storage and not fresh.needs_sync
    with pytest.raises(ValueError):
        assign_ranks(1, "z", members, max_workers=2, host="h", port=9)


def test_world_plan_round_trips_through_json():
    plan = _plan(7, "a")
    assert WorldPlan.from_json(plan.to_json()) == plan
    assert plan.rank_of("b") == 1 and plan.rank_of("zz") is None


def test_liveness():
    assert is_live(Liveness(heartbeat=10.0), now=12.0, heartbeat_timeout=3.0)
    assert not is_live(Liveness(heartbeat=10.0), now=14.0, heartbeat_timeout=3.0)
    assert not is_live(Liveness(heartbeat=10.0, dead=True), now=10.0, heartbeat_timeout=3.0)
    assert not is_live(Liveness(heartbeat=None), now=10.0, heartbeat_timeout=3.0)


@pytest.mark.parametrize(
    "joined,live,elapsed,expect",
    [
        ({"a", "b"}, {"a", "b"}, 0.0, "publish"),  # everyone live is in
        ({"a"}, {"a", "b"}, 0.0, "wait"),  # b is live but not in yet
        ({"a", "b"}, {"a", "b", "c"}, 61.0, "publish"),  # c straggled past the rendezvous timeout
        ({"a"}, {"a"}, 30.0, "wait"),  # below min_workers: wait for capacity
        ({"a"}, {"a"}, 601.0, "give_up"),  # ... but not forever
    ],
)
def test_decide_gather(joined, live, elapsed, expect):
    d = decide_gather(
        joined=joined, live=live, min_workers=2, max_workers=3, now=elapsed, started_at=0.0,
        rendezvous_timeout=60.0, below_min_timeout=600.0,
    )
    got = "publish" if d.publish else "give_up" if d.give_up else "wait"
    assert got == expect, d


def test_first_world_waits_for_max_workers_up_to_the_startup_wait():
    common = dict(joined={"a", "b"}, live={"a", "b"}, min_workers=1, max_workers=3, started_at=0.0,
                  rendezvous_timeout=60.0, below_min_timeout=600.0, startup_wait=10.0)
    assert not decide_gather(now=5.0, **common).publish
    assert decide_gather(now=10.0, **common).publish
    assert decide_gather(now=0.0, **{**common, "joined": {"a", "b", "c"}, "live": {"a", "b", "c"}}).publish


def test_should_grow_only_with_room():
    plan = _plan(2, "a", members=("a", "b"))
    assert should_grow(plan, {"c"}, max_workers=3)
    assert not should_grow(plan, {"c"}, max_workers=2)
    assert not should_grow(plan, set(), max_workers=3)


def test_stale_leader_cannot_commit_a_checkpoint():
    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig

    election = Election(MemoryStore())
    election.claim(1, "old-leader")
    manager = CheckpointManager(CheckpointConfig(uri="memory://fenced-run", async_save=False), fence=election.is_current)
    import torch

    manager.save({"w": torch.ones(2)}, {"__tensor__": "w"}, step=3, term=1)
    election.claim(2, "new-leader")  # the old leader's term is over
    with pytest.raises(StaleTerm):
        manager.save({"w": torch.zeros(2)}, {"__tensor__": "w"}, step=4, term=1)
    assert manager.latest().step == 3
    manager.close()
