"""Spread placement's pure policy and tracker (`fleet/spread.py`, `fleet/spread_tracker.py`): no Ray."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

import elastictrain as et
from elastictrain.fleet.spread import SpreadPolicy, Target, room_by_value, selector_matches
from elastictrain.fleet.spread_tracker import SpreadTracker
from elastictrain.runtime.policy import PlacementPolicy

THREE = {"aws": 2, "gcp": 2, "azure": 2}


def worst_cases(targets: list[Target]):
    """Every way Ray could place these targets (each on any of its values)."""
    return itertools.product(*[t.values for t in targets])


def test_initial_spread_obeys_max_share_wherever_ray_places_each_worker():
    policy = SpreadPolicy("provider", max_share=0.5, pool=4)
    targets = policy.plan_starts(4, placed=[], pending=[], room=THREE)
    assert len(targets) == 4 and not any(t.relaxed for t in targets)
    assert any(len(t.values) > 1 for t in targets), "every target pinned to one value: Ray is given no choice"
    for landing in worst_cases(targets):
        assert max(Counter(landing).values()) <= 2, landing  # cap = 0.5 * 4
    # the selector is Ray's `in()` syntax, next to the user's own labels
    options = PlacementPolicy(et.ScalingConfig(max_workers=4, spread_by="provider", max_share=0.5,
                                               label_selector={"tier": "spot"})).actor_options(
        targets[0].selector("provider"))
    assert options["label_selector"] == {"tier": "spot", "provider": f"in({','.join(sorted(targets[0].values))})"}


def test_a_tight_cap_pins_one_worker_per_provider():
    targets = SpreadPolicy("provider", max_share=0.4, pool=3).plan_starts(3, [], [], THREE)
    assert sorted(t.values for t in targets) == [("aws",), ("azure",), ("gcp",)]


def test_pending_starts_count_against_the_cap():
    policy = SpreadPolicy("provider", max_share=0.5, pool=4)
    first = policy.plan_starts(2, placed=["aws"], pending=[], room=THREE)
    later = policy.plan_starts(1, placed=["aws"], pending=[t.values for t in first], room=THREE)
    for landing in worst_cases(first + later):
        assert max(Counter(["aws", *landing]).values()) <= 2, landing


def test_a_provider_gone_relaxes_to_where_capacity_is_and_says_unmet():
    policy = SpreadPolicy("provider", max_share=0.4, pool=3)
    tracker = SpreadTracker(policy, pending_timeout_s=10)
    for member, value in (("a", "aws"), ("g", "gcp"), ("z", "azure")):
        tracker.started(member, Target((value,)), 0.0)
        tracker.landed(member, value)
    assert tracker.assess() is None  # met from the start: nothing to say
    tracker.gone("z")  # azure vanished
    (replacement,) = tracker.targets(1, {"aws": 1, "gcp": 1, "oracle": 0})
    assert replacement.relaxed and replacement.values == ("aws", "gcp")  # where capacity is: not azure, not full oracle
    tracker.started("r", replacement, 1.0)
    tracker.landed("r", "aws")
    kind, found = tracker.assess()
    assert kind == "spread_unmet" and found.counts == {"aws": 2, "gcp": 1} and found.cap == 1
    assert found.shares == {"aws": 0.6667, "gcp": 0.3333}
    assert tracker.assess() is None  # said once


def test_provider_back_plans_a_move_and_restores():
    policy = SpreadPolicy("provider", max_share=0.4, pool=3)
    tracker = SpreadTracker(policy, pending_timeout_s=10)
    for member, value in (("a", "aws"), ("g", "gcp"), ("r", "aws")):
        tracker.started(member, Target((value,)), 0.0)
        tracker.landed(member, value)
    assert tracker.assess()[0] == "spread_unmet"
    assert tracker.plan_mover(2.0, {"aws": 0, "gcp": 1}) is None  # nowhere under the cap has room
    target = tracker.plan_mover(2.0, {"aws": 0, "gcp": 1, "azure": 2})
    assert target == Target(("azure",))
    tracker.mover_started("m", target, 2.0)
    assert tracker.plan_mover(2.5, {"azure": 2}) is None  # one move at a time
    world = {"a": {}, "g": {}, "r": {}}
    assert tracker.ask(waiting={"m"}, world=world, leader="a") is None  # not placed yet
    tracker.landed("m", "azure")
    assert tracker.ask(waiting=set(), world=world, leader="a") is None  # placed, not yet waiting to join
    ask = tracker.ask(waiting={"m"}, world=world, leader="a")
    assert (ask.member, ask.away_from, ask.to, ask.mover) == ("r", "aws", "azure", "m")  # a follower, not the leader
    assert tracker.assess() is None  # still over until the leaver is gone
    tracker.gone("r")
    kind, found = tracker.assess()
    assert kind == "spread_restored" and found.counts == {"aws": 1, "azure": 1, "gcp": 1}
    assert tracker.plan_mover(5.0, {"aws": 1, "gcp": 1, "azure": 1}) is None


def test_a_worker_pending_too_long_is_retargeted_unconstrained():
    tracker = SpreadTracker(SpreadPolicy("provider", max_share=0.4, pool=3), pending_timeout_s=5)
    (target,) = tracker.targets(1, {"azure": 1})
    tracker.started("p", target, 0.0)
    assert tracker.overdue(4.0) == []
    assert tracker.overdue(6.0) == ["p"]
    (again,) = tracker.targets(1, {"azure": 1})
    assert again.relaxed and again.values is None and again.selector("provider") == {}
    (next_one,) = tracker.targets(1, {"azure": 1})
    assert not next_one.relaxed  # only the replacement goes unconstrained


def test_room_counts_free_slots_of_matching_nodes():
    nodes = [({"provider": "aws", "tier": "spot"}, {"CPU": 3.0}), ({"provider": "aws", "tier": "od"}, {"CPU": 4.0}),
             ({"provider": "gcp", "tier": "spot"}, {"CPU": 0.5}), ({"tier": "spot"}, {"CPU": 8.0})]
    assert room_by_value(nodes, "provider", {"CPU": 1.0}, {"tier": "spot"}) == {"aws": 3, "gcp": 0}
    assert room_by_value(nodes, "provider", {"CPU": 2.0, "GPU": 0.0}) == {"aws": 3, "gcp": 0}
    assert selector_matches({"p": "a"}, {"p": "in(a,b)"}) and not selector_matches({"p": "a"}, {"p": "!in(a, b)"})


@pytest.mark.parametrize("kwargs, fix", [
    (dict(max_workers=4, spread_by="provider", max_share=0.2), "raise max_share to at least 0.25"),
    (dict(max_workers=2, spares=1, spread_by="provider", max_share=0.3), "raise max_share to at least 0.3333"),
    (dict(max_share=0.5), "name the node label to spread over"),
    (dict(spread_by="provider", label_selector={"provider": "aws"}), "drop it from label_selector"),
    (dict(spread_by="has space"), "is not a node label name"),
    (dict(spread_by="provider", max_share=1.5), "less than or equal to 1"),
])
def test_impossible_spreads_are_refused_at_config_time(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        et.ScalingConfig(**kwargs)


def test_spares_count_toward_the_cap():
    assert et.ScalingConfig(max_workers=2, spares=1, spread_by="provider", max_share=0.34).max_share == 0.34
    assert SpreadPolicy("provider", 0.5, pool=2 + 2).cap == 2


def test_restored_only_once_no_start_is_pending():
    tracker = SpreadTracker(SpreadPolicy("provider", max_share=0.4, pool=3), pending_timeout_s=10)
    for member, value in (("a", "aws"), ("b", "aws"), ("g", "gcp")):
        tracker.started(member, Target((value,)), 0.0)
        tracker.landed(member, value)
    assert tracker.assess()[0] == "spread_unmet"
    tracker.gone("b")
    tracker.started("c", Target(("aws", "azure")), 1.0)  # could still land on aws
    assert tracker.assess() is None
    tracker.landed("c", "azure")
    assert tracker.assess()[0] == "spread_restored"
