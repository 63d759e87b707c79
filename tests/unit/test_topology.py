"""Named groups of a world, planned without Ray or torch."""

from __future__ import annotations

import pytest

from elastictrain.election.policy import assign_ranks
from elastictrain.election.term import Member, WorldPlan
from elastictrain.election.topology import Topology, TopologyPolicy, plan_topology

REGIONS = [{"region": "us"}, {"region": "eu"}, {"region": "us"}, {"region": "eu"}, {}]


def test_flat_world_has_only_the_world_group():
    topo = plan_topology(["a", "b", "c"])
    assert dict(topo.groups) == {"world": (0, 1, 2)}
    assert topo.names() == ("world",) and topo.world_size == 3


def test_one_group_per_label_value_and_a_group_of_their_leaders():
    topo = plan_topology(["a", "b", "c", "d", "e"], REGIONS, TopologyPolicy(group_by=("region",)))
    assert topo.ranks("region:us") == (0, 2)
    assert topo.ranks("region:eu") == (1, 3)
    assert topo.ranks("region:") == (4,)  # a node without the label is a group of its own value
    assert topo.ranks("leaders:region") == (0, 1, 4)
    assert topo.group_of(3, "region") == "region:eu" and topo.leaders("region") == "leaders:region"
    assert topo.groups_of(2) == ("world", "region:us")
    assert topo.groups_of(1) == ("world", "leaders:region", "region:eu")
    # every rank creates the groups in the same order: the world first, then by name
    assert topo.names() == ("world", "leaders:region", "region:", "region:eu", "region:us")


def test_two_labels_give_independent_groupings():
    labels = [{"region": "us", "provider": "x"}, {"region": "us", "provider": "y"}, {"region": "eu", "provider": "y"}]
    topo = plan_topology(["a", "b", "c"], labels, TopologyPolicy(group_by=("region", "provider")))
    assert topo.ranks("provider:y") == (1, 2) and topo.ranks("region:us") == (0, 1)
    assert topo.ranks("leaders:provider") == (0, 1) and topo.ranks("leaders:region") == (0, 2)


def test_unknown_groups_and_bad_input_say_what_is_wrong():
    topo = plan_topology(["a", "b"], [{"region": "us"}, {"region": "eu"}])
    with pytest.raises(KeyError, match="groups: \\['world'\\]"):
        topo.ranks("region:us")
    with pytest.raises(KeyError, match="does not group by 'region'"):
        topo.group_of(0, "region")
    with pytest.raises(ValueError, match="appears twice"):
        plan_topology(["a", "a"])
    with pytest.raises(ValueError, match="one per rank"):
        plan_topology(["a", "b"], [{}])
    for bad in ("", "a:b", "leaders"):
        with pytest.raises(ValueError, match="label name"):
            TopologyPolicy(group_by=(bad,))
    with pytest.raises(ValueError, match="twice"):
        TopologyPolicy(group_by=("region", "region"))


def test_the_published_plan_carries_each_ranks_labels_through_json():
    members = [Member("a", 1.0, committed_step=3, labels={"region": "eu"}),
               Member("b", 2.0, committed_step=5, labels={"region": "us"})]
    plan = assign_ranks(2, "a", members, max_workers=2, host="h", port=1)
    assert plan.members == ("b", "a") and plan.labels == ({"region": "us"}, {"region": "eu"})
    again = WorldPlan.from_json(plan.to_json())
    assert again == plan
    topo = plan_topology(again.members, again.labels, TopologyPolicy(group_by=("region",)))
    assert topo.ranks("region:eu") == (1,)


def test_topology_is_immutable():
    topo = plan_topology(["a"], [{"region": "us"}], TopologyPolicy(group_by=("region",)))
    with pytest.raises(TypeError):
        topo.groups["x"] = (0,)  # type: ignore[index]
    with pytest.raises(TypeError):
        topo.labels[0]["region"] = "eu"  # type: ignore[index]
    assert isinstance(topo, Topology)


def test_old_election_names_still_resolve_with_a_warning():
    from elastictrain.election import term

    with pytest.warns(DeprecationWarning, match="assign_ranks"):
        old = term.plan_world
    assert old is assign_ranks
    with pytest.raises(AttributeError):
        term.no_such_name  # noqa: B018
