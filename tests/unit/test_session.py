"""The context talks to the runtime only through a per-term session."""

from __future__ import annotations

import ast
import pathlib
import types

import pytest
import torch

import elastictrain.runtime.context as context_module
from elastictrain.election.topology import TopologyPolicy, plan_topology
from elastictrain.runtime.context import Context
from elastictrain.runtime.session import TermSession

WORLD = types.SimpleNamespace(rank=1, world_size=3, term=4, is_leader=False, member_id="b")
TOPOLOGY = plan_topology(["a", "b", "c"], [{"region": "us"}, {"region": "eu"}, {"region": "us"}],
                         TopologyPolicy(group_by=("region",)))


def test_the_context_module_does_not_import_the_runner():
    tree = ast.parse(pathlib.Path(context_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "elastictrain.runtime.runner" not in imported


def test_term_is_the_worlds_term_and_generation_is_its_deprecated_name():
    ctx = Context(types.SimpleNamespace(), WORLD, torch.device("cpu"))
    assert ctx.term == 4
    with pytest.warns(DeprecationWarning, match="ctx.term"):
        assert ctx.generation == 4


def test_a_session_hands_out_only_the_groups_its_rank_is_in():
    groups = {"world": "W", "region:eu": "EU", "leaders:region": "L"}
    session = TermSession(runner=None, world=WORLD, topology=TOPOLOGY, groups=groups)
    ctx = Context(session, WORLD, torch.device("cpu"))
    assert (ctx.group(), ctx.group("region:eu"), ctx.group("leaders:region")) == ("W", "EU", "L")
    assert ctx.topology is TOPOLOGY
    with pytest.raises(KeyError, match="not in group 'region:us'"):
        ctx.group("region:us")
    with pytest.raises(KeyError, match="no group 'zone:x'"):
        ctx.group("zone:x")
