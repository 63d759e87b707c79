"""`ctx.keep`: a survivor's objects are carried from one entry of train_fn to the next, never built or
loaded again; a step lost in flight is still undone on them, in place. One worker, no Ray."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from elastictrain.runtime.keep import KeptObjects
from elastictrain.runtime.state import ElasticState
from tests.unit.test_state_rollback import _assert_same, _entry, _runner, _snapshot, _step, _world


def test_a_kept_object_is_built_once_and_handed_out_again_on_later_entries():
    kept, calls = KeptObjects(), []

    def factory():
        calls.append(1)
        return object()

    kept.begin_entry()
    first = kept.keep("net", factory)
    kept.end_entry(registered=True)
    kept.begin_entry()
    assert kept.keep("net", factory) is first
    assert len(calls) == 1 and kept.built == 1


def test_a_name_asked_for_twice_in_one_entry_is_an_error():
    kept = KeptObjects()
    kept.begin_entry()
    kept.keep("net", object)
    with pytest.raises(ValueError, match="already called in this entry"):
        kept.keep("net", object)
    with pytest.raises(TypeError, match="callable"):
        kept.keep("opt", torch.nn.Linear(1, 1).weight)
    with pytest.raises(TypeError, match="non-empty string"):
        kept.keep("", object)


def test_a_factory_that_raises_keeps_nothing_and_the_next_call_builds_again():
    kept = KeptObjects()
    kept.begin_entry()
    with pytest.raises(RuntimeError, match="out of memory"):
        kept.keep("net", lambda: (_ for _ in ()).throw(RuntimeError("out of memory")))
    assert "net" not in kept
    assert kept.keep("net", lambda: 7) == 7


def test_what_an_entry_did_not_ask_for_is_dropped_and_the_run_end_drops_everything():
    kept = KeptObjects()
    kept.begin_entry()
    kept.keep("net", object)
    kept.keep("old", object)
    kept.end_entry(registered=True)
    kept.begin_entry()
    kept.keep("net", object)
    kept.end_entry(registered=False)  # cut short before ctx.state: nothing is dropped yet
    assert "old" in kept
    kept.begin_entry()
    kept.keep("net", object)
    kept.end_entry(registered=True)
    assert "old" not in kept and "net" in kept
    kept.release()
    assert len(kept) == 0


def _counting_loads(state: ElasticState) -> list[str]:
    """Record every load_state_dict on the state's model and optimizer (a scheduler's state_dict would carry
    the patch)."""
    loads: list[str] = []
    for name in ("model", "opt"):
        obj = getattr(state, name)
        real = obj.load_state_dict

        def load(sd, *args, _name=name, _real=real, **kwargs):
            loads.append(_name)
            return _real(sd, *args, **kwargs)

        obj.load_state_dict = load
    return loads


def _run_kept(lose_at: int, how: str, steps: int = 6) -> tuple[dict, list[str], bool]:
    """As `test_state_rollback._run`, but the re-entry registers the same model and optimizer objects
    (ctx.keep) with new plain entries; returns the end state, what was loaded, and whether the
    parameters and optimizer moments are the same tensors after the rebuild."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    data = [torch.randn(5, 3, 8, 8) for _ in range(steps)]
    runner = _runner()
    state = _entry()
    runner.restore(state, _world(1, -1))
    step, loads, same_tensors = 0, [], True
    while step < steps:
        if step == lose_at and how:
            _step(state, data[step], lose=how)
            ptrs = [p.data_ptr() for p in state.model.parameters()]
            moments = [id(t) for s in state.opt.state.values() for t in s.values()]
            runner._live.release_world()
            how = ""
            objects = {n: getattr(state, n) for n in ("model", "opt", "sched", "scaler", "ema")}
            state = ElasticState({**objects, "draws": [], "tokens": np.int64(0)})  # the loop's new plain values
            loads = _counting_loads(state)
            runner.restore(state, _world(2, step))
            assert state.step == step
            same_tensors = (ptrs == [p.data_ptr() for p in state.model.parameters()]
                            and moments == [id(t) for s in state.opt.state.values() for t in s.values()])
            continue
        _step(state, data[step])
        state.step = step = step + 1
        runner.on_commit(state, _world(1, step), step - 1)
    return _snapshot(state), loads, same_tensors


@pytest.mark.parametrize("how", ["after_forward", "after_skipped_step"])
def test_a_step_lost_in_flight_is_undone_on_kept_objects_in_place_without_loading_them(how):
    clean, _, _ = _run_kept(-1, "")
    assert clean["model"]["1.num_batches_tracked"] == 6
    lost, loads, same_tensors = _run_kept(3 if how == "after_forward" else 2, how)
    _assert_same(lost, clean)  # BatchNorm statistics, LR, scale, plain entries and RNG as in the clean run
    assert "model" not in loads and "opt" not in loads, f"kept objects were loaded: {loads}"
    assert same_tensors


def test_a_new_object_in_place_of_a_kept_one_is_still_loaded():
    runner = _runner()
    state = _entry()
    runner.restore(state, _world(1, -1))
    state.step = 1
    runner.on_commit(state, _world(1, 1), 0)
    runner._live.release_world()
    fresh = _entry(seed_model=99)
    renewed = ElasticState({"model": state.model, "opt": state.opt, "sched": state.sched,
                            "scaler": state.scaler, "ema": fresh.ema, "draws": [], "tokens": np.int64(0)})
    assert renewed.kept_from(runner._live) == {"model", "opt", "sched", "scaler"}
    runner.restore(renewed, _world(2, 1))
    for k, v in state.ema.state_dict().items():
        assert torch.equal(fresh.ema.state_dict()[k], v), k


def test_a_kept_module_is_recognised_through_compile_and_ddp_wrappers():
    net = torch.nn.Linear(2, 2)
    live = ElasticState({"model": torch.compile(net, backend="eager"), "opt": torch.optim.SGD(net.parameters(), lr=1)})
    again = ElasticState({"model": torch.compile(net, backend="eager"), "opt": live.opt})  # new wrapper, same module
    assert again.kept_from(live) == {"model", "opt"}
    assert ElasticState({"model": torch.nn.Linear(2, 2), "opt": live.opt}).kept_from(live) == {"opt"}


def test_wrapping_a_kept_module_again_leaves_no_hook_of_the_old_wrapper(tmp_path):
    """Each entry wraps the kept module in a new DDP; with mixed precision, DDP hangs forward pre-hooks on
    every submodule. Released at the end of each world, they do not pile up across rebuilds."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecision

    from elastictrain.runtime.keep import unhook_ddp

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))

        def hooks() -> int:
            return sum(len(m._forward_pre_hooks) for m in net.modules())

        mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
        counts = []
        for _ in range(3):  # three worlds
            ddp = torch.nn.parallel.DistributedDataParallel(net, init_sync=False, mixed_precision=mixed)
            counts.append(hooks())
            unhook_ddp(ddp)
            assert hooks() == 0
        assert counts == [counts[0]] * 3 and counts[0] > 0
    finally:
        dist.destroy_process_group()
