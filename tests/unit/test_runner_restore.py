"""Runner.restore on a member behind: the state lands in its own tensors, so until the last byte has
landed it holds no committed step to bid (no Ray; the broadcast is replaced by a function that writes
part of rank 0's state and fails, as a transfer cut short by a lost peer does)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import NO_STATE, WorldPlan
from elastictrain.runtime import runner as runner_module
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState
from elastictrain.runtime.world import WorldInfo


def _behind_member() -> tuple[Runner, ElasticState, WorldInfo]:
    """Member m1 holding step 3 of its last world; the new world's rank 0 (m0) holds step 5."""
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(max_workers=2),
                   batch=BatchConfig(global_batch_size=8), checkpoint=CheckpointConfig(), failure=FailureConfig(),
                   run=RunConfig())
    runner = Runner("m1", lambda ctx: None, spec, Election(MemoryStore()), lambda records: None, {},
                    torch.device("cpu"))
    live = ElasticState({"w": torch.nn.Linear(4, 4)})
    live.step = 3
    runner._live = live
    runner._mark_committed(live)
    plan = WorldPlan(term=2, leader="m0", members=("m0", "m1"), steps=(5, 3), host="h", port=1)
    return runner, live, WorldInfo.from_plan(plan, "m1")


def test_a_transfer_cut_short_leaves_the_member_with_no_state_to_bid(monkeypatch):
    runner, live, world = _behind_member()

    def cut_short(state, **_):
        with torch.no_grad():
            state.w.weight.fill_(5.0)  # rank 0's weight landed in place; its bias never did
        raise dist.DistNetworkError("Connection reset by peer")

    monkeypatch.setattr(runner_module, "take_rank0_state", cut_short)
    with pytest.raises(dist.DistNetworkError):
        runner.restore(live, world)
    # it must not bid step 3 again: its weight is step 5's, its bias step 3's
    assert runner.committed == NO_STATE and runner._live is None


def test_a_transfer_that_lands_whole_marks_the_sources_step(monkeypatch):
    runner, live, world = _behind_member()

    def whole(state, **_):
        state.step = 5

    monkeypatch.setattr(runner_module, "take_rank0_state", whole)
    runner.restore(live, world)
    assert runner.committed == 5 and runner._live is live
