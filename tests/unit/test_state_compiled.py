"""A `torch.compile`d model, compiled before or after its DDP wrap, is saved under the names of the plain
module, and plain state loads into it (and back). A one-rank gloo group on a file store, no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from elastictrain.runtime.state import ElasticState, plain_module


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


WRAPS = {
    "compiled": lambda m: torch.compile(m, backend="eager"),
    "compiled_then_ddp": lambda m: torch.nn.parallel.DistributedDataParallel(torch.compile(m, backend="eager")),
    "ddp_then_compiled": lambda m: torch.compile(torch.nn.parallel.DistributedDataParallel(m), backend="eager"),
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_compiled_models_are_saved_and_loaded_under_plain_names(group, wrap):
    torch.manual_seed(0)
    plain = _net()
    model = WRAPS[wrap](_net())
    model(torch.randn(3, 4)).sum().backward()  # compiled and run: BatchNorm counted one batch
    assert plain_module(model) is not model and isinstance(plain_module(model), torch.nn.Sequential)
    tensors, _ = ElasticState({"model": model}).flatten()
    names = {n for n in tensors if n.startswith("objects/model/")}
    assert names == {f"objects/model/{k}" for k in plain.state_dict()}

    ElasticState({"model": plain}).load_tree(ElasticState({"model": model}).tree())  # compiled -> plain
    assert int(plain[1].num_batches_tracked) == 1
    fresh = WRAPS[wrap](_net())
    ElasticState({"model": fresh}).load_tree(ElasticState({"model": plain}).tree())  # plain -> compiled
    for (k, a), b in zip(plain.state_dict().items(), plain_module(fresh).state_dict().values()):
        assert torch.equal(a, b), k


def test_release_world_keeps_the_plain_module(group):
    inner = _net()
    state = ElasticState({"model": WRAPS["ddp_then_compiled"](inner)})
    state.release_world()
    assert state.model is inner
