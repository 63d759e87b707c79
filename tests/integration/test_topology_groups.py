"""The named process groups of a topology over real gloo groups (spawned processes on 127.0.0.1, no Ray)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from elastictrain.election.topology import TopologyPolicy, plan_topology
from elastictrain.runtime.process_group import build_groups
from elastictrain.runtime.state import broadcast_tree
from tests.gloo_ranks import run_ranks

MEMBERS = ["a", "b", "c", "d"]
LABELS = [{"region": "us"}, {"region": "eu"}, {"region": "us"}, {"region": "eu"}]


def _member(rank: int) -> dict:
    topo = plan_topology(MEMBERS, LABELS, TopologyPolicy(group_by=("region",)))
    groups = build_groups(topo, rank, timeout_s=60)
    sums = {}
    for name, group in groups.items():
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value, group=group)
        sums[name] = value.item()
    # rank 0 of the region group (its lowest global rank) is the source of a state broadcast in it
    region = groups[topo.group_of(rank, "region")]
    tree = broadcast_tree({"w": torch.full((3,), float(rank))} if dist.get_rank(region) == 0 else None,
                          src=0, device=torch.device("cpu"), group=region)
    return {"groups": sorted(groups), "sums": sums, "w": tree["w"].tolist()}


def test_every_rank_reduces_in_its_own_named_groups():
    got = run_ranks(_member, 4)
    # world: 1+2+3+4; region:us = ranks 0, 2 -> 1+3; region:eu = ranks 1, 3 -> 2+4; leaders:region = ranks 0, 1 -> 1+2
    assert got[0]["sums"] == {"world": 10.0, "region:us": 4.0, "leaders:region": 3.0}
    assert got[1]["sums"] == {"world": 10.0, "region:eu": 6.0, "leaders:region": 3.0}
    assert got[2]["sums"] == {"world": 10.0, "region:us": 4.0}
    assert got[3]["sums"] == {"world": 10.0, "region:eu": 6.0}
    # each region's state came from its own lowest rank, not from the world's rank 0
    assert [got[r]["w"] for r in range(4)] == [[0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3]
