"""Resume from a checkpoint (a new process's runner reads it): buffers, LR scheduler, GradScaler, EMA,
numpy scalars and the torch, numpy and `random` RNGs continue as in an uninterrupted run; an older
checkpoint without the numpy and `random` states still loads. memory:// storage, no Ray."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest
import torch

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.runtime.rng import rng_state, set_rng_state
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState
from tests.unit.test_state_rollback import _assert_same, _entry, _run, _snapshot, _step, _world


def _runner(uri: str) -> Runner:
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(), batch=BatchConfig(global_batch_size=8),
                   checkpoint=CheckpointConfig(uri=uri, every_steps=1000, async_save=False), failure=FailureConfig(),
                   run=RunConfig())
    election = Election(MemoryStore())
    assert election.claim(1, "m0")
    return Runner("m0", lambda ctx: None, spec, election, lambda records: None, {}, torch.device("cpu"))


def _resumed_run(stop_at: int, steps: int = 6) -> dict:
    """Steps [0, stop_at) in one runner, saved; then a new runner restores the checkpoint into new objects
    (other initial weights, other RNG states) and runs the rest."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    data = [torch.randn(5, 3, 8, 8) for _ in range(steps)]
    uri = f"memory://state-resume-{uuid.uuid4().hex}"
    first = _runner(uri)
    state = _entry()
    first.restore(state, _world(1, -1))
    for step in range(stop_at):
        _step(state, data[step])
        state.step = step + 1
        first.on_commit(state, _world(1, step + 1), step)
    assert first._save(state, _world(1, stop_at), wait=True) is None
    first._close_checkpoints()

    torch.manual_seed(7)  # a new process: nothing of the first one's generators is left
    np.random.seed(8)
    random.seed(9)
    second = _runner(uri)
    state = _entry(seed_model=99)
    second.restore(state, _world(1, -1))
    assert state.step == stop_at
    for step in range(stop_at, steps):
        _step(state, data[step])
        state.step = step + 1
        second.on_commit(state, _world(1, step + 1), step)
    second._close_checkpoints()
    return _snapshot(state)


def test_resume_from_a_checkpoint_continues_every_object_and_generator():
    _assert_same(_resumed_run(3), _run(-1, ""))


def test_a_checkpoint_without_numpy_or_random_states_still_loads():
    state = ElasticState({"w": torch.zeros(2)})
    np.random.seed(5)
    random.seed(6)
    expected = (np.random.rand(), random.random())
    np.random.seed(5)
    random.seed(6)
    state.load_tree({"step": 4, "objects": {"w": torch.ones(2)}, "rng": {"torch": torch.get_rng_state()}})
    assert state.step == 4 and (np.random.rand(), random.random()) == expected  # left as they were


def test_rng_states_flatten_to_tensors_and_json_scalars():
    from elastictrain.statetree import flatten_state, skeleton_from_json, skeleton_to_json, unflatten_state

    saved = rng_state()
    expected = (float(torch.rand(())), np.random.rand(), random.random())
    tensors, skeleton = flatten_state({"rng": saved})
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = unflatten_state(tensors, skeleton_from_json(skeleton_to_json(skeleton)))["rng"]
    set_rng_state(back)
    assert (float(torch.rand(())), np.random.rand(), random.random()) == expected


@pytest.mark.parametrize("bad", [{"numpy": {"kind": "MT19937", "keys": torch.zeros(3, dtype=torch.int64), "pos": 0,
                                            "has_gauss": 0, "gauss": 0.0}},
                                 {"random": {"version": 3, "state": "x", "gauss": None}},
                                 {"numpy": {"keys": torch.zeros(624, dtype=torch.int64)}}])
def test_a_malformed_rng_state_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="RNG state|random state"):
        set_rng_state({"torch": torch.get_rng_state(), **bad})


def test_seed_everything_seeds_torch_numpy_and_random_alike():
    import random

    import numpy as np

    from elastictrain.runtime.rng import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((float(torch.rand(())), float(np.random.rand()), random.random()))
        seed_everything(8)
        draws.append((float(torch.rand(())), float(np.random.rand()), random.random()))
    assert draws[0] == draws[2] and draws[1] == draws[3]
    assert all(a != b for a, b in zip(draws[0], draws[1]))
