"""Configuration checked where it is given: a clear error before any worker starts."""

from __future__ import annotations

import pytest

import elastictrain as et
from elastictrain.trainer import actor_options


def _noop(ctx):
    pass


def test_global_batch_smaller_than_max_workers_is_refused_up_front():
    with pytest.raises(ValueError, match="raise global_batch_size to at least 4"):
        et.ElasticTrainer(_noop, scaling=et.ScalingConfig(max_workers=4), batch=et.BatchConfig(global_batch_size=3, micro_batch_size=1))
    et.ElasticTrainer(_noop, scaling=et.ScalingConfig(max_workers=4), batch=et.BatchConfig(global_batch_size=4, micro_batch_size=1))


def test_gpu_resources_are_honoured_or_refused():
    assert actor_options(et.ScalingConfig())["num_gpus"] == 0
    assert actor_options(et.ScalingConfig(use_gpu=True))["num_gpus"] == 1
    options = actor_options(et.ScalingConfig(use_gpu=True, resources_per_worker={"CPU": 2, "GPU": 0.5, "TPU": 1}))
    assert options == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"TPU": 1}}
    with pytest.raises(ValueError, match="set use_gpu=True"):
        et.ScalingConfig(resources_per_worker={"CPU": 1, "GPU": 2})
    with pytest.raises(ValueError, match="use_gpu=True"):
        et.ScalingConfig(use_gpu=True, resources_per_worker={"GPU": 0})
