"""Heartbeats carry progress and are judged on the observer's monotonic clock (pure, no Ray)."""

from __future__ import annotations

import pytest

from elastictrain.config import FailureConfig
from elastictrain.election.election import Election
from elastictrain.election.heartbeat import Beat, BeatWatch, is_hung
from elastictrain.election.store import MemoryStore
from elastictrain.election.policy import is_live
from elastictrain.election.term import Member


def test_a_beat_round_trips_and_junk_is_not_a_beat():
    beat = Beat(seq=7, progress=41, in_loop=True)
    assert Beat.from_bytes(beat.to_bytes()) == beat
    for junk in (b"", b"1733.5", b"[]", b'{"seq": "7"}', b'{"seq": 1, "in_loop": 1}', b'{"seq": true}', b"x" * 300):
        assert Beat.from_bytes(junk) is None


def test_liveness_follows_the_observers_clock_not_the_senders():
    watch = BeatWatch()
    assert watch.observe("a", None, now=5.0) is None
    seen = watch.observe("a", Beat(seq=1).to_bytes(), now=100.0)
    assert seen.beat_at == 100.0
    # the same beat read again later is not news: the beat ages on the observer's clock
    assert watch.observe("a", Beat(seq=1).to_bytes(), now=103.0).beat_at == 100.0
    assert watch.observe("a", Beat(seq=2).to_bytes(), now=104.0).beat_at == 104.0


def test_election_liveness_is_judged_by_when_the_beat_changed_here():
    election = Election(MemoryStore())
    election.register(Member(id="a", joined_at=0.0))
    live = election.liveness("a", now=50.0)
    assert is_live(live, 52.0, heartbeat_timeout=3.0)
    assert not is_live(election.liveness("a", now=54.0), 54.0, heartbeat_timeout=3.0)  # no new beat since 50
    election.heartbeat("a")
    assert is_live(election.liveness("a", now=55.0), 55.0, heartbeat_timeout=3.0)
    assert election.live_ids(3.0, now=57.0) == {"a"} and election.live_ids(3.0, now=59.0) == set()


def test_a_loop_without_progress_is_hung_while_its_beats_go_on():
    watch = BeatWatch()
    for seq, now in enumerate((0.0, 1.0, 2.0, 3.0, 4.0)):
        seen = watch.observe("a", Beat(seq=seq, progress=10, in_loop=True).to_bytes(), now)
    assert seen.beat_at == 4.0 and seen.progress_at == 0.0
    assert is_hung(seen, now=4.0, hang_timeout=3.5) and not is_hung(seen, now=4.0, hang_timeout=5.0)
    assert not is_hung(seen, now=4.0, hang_timeout=None)
    seen = watch.observe("a", Beat(seq=9, progress=11, in_loop=True).to_bytes(), 5.0)
    assert seen.progress_at == 5.0 and not is_hung(seen, now=6.0, hang_timeout=3.5)


def test_outside_the_loop_no_progress_is_expected_and_entering_it_restarts_the_clock():
    watch = BeatWatch()
    watch.observe("a", Beat(seq=0, progress=3, in_loop=False).to_bytes(), 0.0)
    seen = watch.observe("a", Beat(seq=1, progress=3, in_loop=False).to_bytes(), 100.0)
    assert not is_hung(seen, now=100.0, hang_timeout=10.0)  # a rendezvous or a restore
    seen = watch.observe("a", Beat(seq=2, progress=3, in_loop=True).to_bytes(), 101.0)
    assert seen.progress_at == 101.0 and not is_hung(seen, now=105.0, hang_timeout=10.0)


def test_hang_timeout_must_exceed_the_collective_timeout():
    with pytest.raises(ValueError, match="hang_timeout_s=5.0 must exceed collective_timeout_s=10.0"):
        FailureConfig(hang_timeout_s=5.0, collective_timeout_s=10.0)
    assert FailureConfig(hang_timeout_s=None).hang_timeout_s is None
