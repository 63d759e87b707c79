"""A survivor's kept objects with the accumulation core, on the CPU and (marked) on a GPU: after a step lost
in flight the rebuild puts the committed buffers back into the same tensors, allocates nothing on the
device, and the next step goes on from there. One worker, no Ray."""

from __future__ import annotations

import pytest
import torch

from elastictrain.accumulate import GradAccumulator
from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState
from tests.unit.test_state_rollback import _world

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


class _PeerLost(Exception):
    pass


def _runner(device: torch.device) -> Runner:
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(), batch=BatchConfig(global_batch_size=8),
                   checkpoint=CheckpointConfig(), failure=FailureConfig(), run=RunConfig())
    return Runner("m0", lambda ctx: None, spec, Election(MemoryStore()), lambda records: None, {}, device)


def _step(acc: GradAccumulator, model: torch.nn.Module, x: torch.Tensor) -> None:
    with acc.step(num_micro_batches=2) as s:
        for half in x.chunk(2):
            s.backward(model(half).square().sum(), num_items=half.shape[0])


def _train(device: str, lose_at: int, steps: int = 4):
    """`steps` steps of a model with BatchNorm under GradAccumulator; at `lose_at` a first attempt runs its
    forward and backward and is lost, and the step runs again on the kept objects."""
    dev = torch.device(device)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 64)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    data = [torch.randn(16, 64, device=dev) for _ in range(steps)]
    runner, state = _runner(dev), ElasticState({"model": net, "opt": opt})
    runner.restore(state, _world(1, -1))
    acc, step, seen = GradAccumulator(net, opt), 0, {}
    while step < steps:
        if step == lose_at:
            lose_at = -1
            with pytest.raises(_PeerLost):  # a peer dies in the step's all-reduce: no optimizer step
                with acc.step(num_micro_batches=2) as s:
                    s.backward(net(data[step][:8]).square().sum(), num_items=8)
                    raise _PeerLost
            runner._live.release_world()
            ptrs = [t.data_ptr() for t in [*net.parameters(), *net.buffers()]]
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                seen["before"] = torch.cuda.memory_allocated()
            state = ElasticState({"model": net, "opt": opt})  # the new entry registers the kept objects
            runner.restore(state, _world(2, step))
            if dev.type == "cuda":
                torch.cuda.synchronize()
                seen["peak"] = torch.cuda.max_memory_allocated()
            seen["same"] = ptrs == [t.data_ptr() for t in [*net.parameters(), *net.buffers()]]
            seen["grads"] = [p.grad for p in net.parameters()]
            acc = GradAccumulator(net, opt)
            continue
        _step(acc, net, data[step])
        state.step = step = step + 1
        runner.on_commit(state, _world(1, step), step - 1)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, seen


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_rebuild_keeps_the_tensors_in_place_and_allocates_nothing(device):
    clean, _ = _train(device, lose_at=-1)
    lost, seen = _train(device, lose_at=2)
    assert seen["same"], "the rebuild replaced a parameter or buffer tensor"
    assert all(g is None for g in seen["grads"]), "the lost step's gradients outlived the rebuild"
    for k in clean:
        torch.testing.assert_close(lost[k], clean[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    if device == "cuda":
        assert seen["peak"] <= seen["before"], f"the rebuild allocated {seen['peak'] - seen['before']} bytes"
