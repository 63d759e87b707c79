"""Members racing through the rendezvous on an in-memory store, in threads."""

from __future__ import annotations

import threading
import time

import pytest

from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import NO_STATE, Member
from elastictrain.runtime.rendezvous import Rendezvous, RendezvousPolicy, RunEnded

POLICY = RendezvousPolicy(
    min_workers=2, max_workers=4, heartbeat_timeout_s=2.0, rendezvous_timeout_s=5.0, below_min_timeout_s=3.0
)


def _rendezvous(election: Election, member_id: str, policy=POLICY) -> Rendezvous:
    return Rendezvous(election, member_id, policy, open_store=lambda: ("127.0.0.1", 1234, None))


def _race(election, members, **kwargs):
    results, errors = {}, []

    def go(member):
        try:
            results[member.id] = _rendezvous(election, member.id).next_world(member, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(m,)) for m in members]
    for m in members:
        election.register(m)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    return results


def test_first_world_has_every_member_and_one_leader():
    election = Election(MemoryStore())
    members = [Member(f"m{i}", joined_at=float(i)) for i in range(3)]
    worlds = _race(election, members, last_term=0, was_member=False)
    plans = set(worlds.values())
    assert len(plans) == 1
    plan = plans.pop()
    assert sorted(plan.members) == ["m0", "m1", "m2"] and plan.term == 1
    assert election.leader_of(1) == plan.leader


def test_survivor_with_the_newest_step_becomes_rank_zero():
    election = Election(MemoryStore())
    members = [
        Member("behind", joined_at=0.0, committed_step=4),
        Member("ahead", joined_at=1.0, committed_step=5),
        Member("new", joined_at=2.0, committed_step=NO_STATE),
    ]
    worlds = _race(election, members, last_term=0, was_member=True)
    plan = next(iter(worlds.values()))
    assert plan.members[0] == "ahead" and plan.source_step == 5 and plan.needs_sync


def test_dead_member_is_not_waited_for():
    election = Election(MemoryStore())
    ghost = Member("ghost", joined_at=0.0)
    election.register(ghost)
    election.mark_dead("ghost")
    members = [Member("a", 1.0, 3), Member("b", 2.0, 3)]
    started = time.monotonic()
    worlds = _race(election, members, last_term=0, was_member=True)
    assert set(next(iter(worlds.values())).members) == {"a", "b"}
    assert time.monotonic() - started < POLICY.rendezvous_timeout_s


def test_late_member_waits_for_the_leader_to_grow_the_world():
    election = Election(MemoryStore())
    members = [Member("a", 0.0, 3), Member("b", 1.0, 3)]
    _race(election, members, last_term=0, was_member=True)
    late = Member("late", 5.0)
    election.register(late)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("w", _rendezvous(election, "late").next_world(late, last_term=0, was_member=False)))
    t.start()
    time.sleep(0.3)
    assert "w" not in got  # the world of term 1 is training; the late member waits
    # The leader stops at a step boundary and everyone rendezvous for term 2.
    grown = _race(election, [Member("a", 0.0, 9), Member("b", 1.0, 9)], last_term=1, was_member=True)
    t.join(timeout=10)
    assert got["w"].term == 2 and set(got["w"].members) == {"a", "b", "late"}
    assert next(iter(grown.values())) == got["w"]


def test_too_few_workers_for_too_long_ends_the_run():
    election = Election(MemoryStore())
    lonely = Member("lonely", 0.0, 3)
    election.register(lonely)
    policy = RendezvousPolicy(min_workers=2, max_workers=2, heartbeat_timeout_s=2.0,
                              rendezvous_timeout_s=0.2, below_min_timeout_s=0.5)
    with pytest.raises(Exception) as err:
        _rendezvous(election, "lonely", policy).next_world(lonely, last_term=0, was_member=True)
    assert "min_workers" in str(err.value)
    assert election.outcome().startswith("failed:")
    with pytest.raises(RunEnded):
        _rendezvous(election, "other", policy).next_world(Member("other", 1.0), last_term=0, was_member=False)


def test_a_group_that_failed_to_form_leaves_the_next_one_named_as_on_a_new_worker():
    """A peer that dies while a term's group forms makes init_process_group raise half-way; the next
    term's group must still get the name (and so the rendezvous keys) a brand-new worker gives it."""
    from datetime import timedelta

    import torch.distributed as dist

    from elastictrain.runtime.process_group import destroy_group

    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=1), wait_for_workers=False)
    with pytest.raises(Exception):  # rank 1 of 2 never comes: the wait times out
        dist.init_process_group("gloo", store=dist.PrefixStore("t1", store), rank=0, world_size=2,
                                timeout=timedelta(seconds=1))
    assert not dist.is_initialized()
    destroy_group("gloo")
    dist.init_process_group("gloo", store=dist.PrefixStore("t2", store), rank=0, world_size=1)
    try:
        assert dist.distributed_c10d._get_default_group().group_name == "0"
    finally:
        dist.destroy_process_group()
