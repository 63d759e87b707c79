"""elastictrain: PyTorch training that survives preemptible machines.

Public names only; each resolves lazily so that `import elastictrain` stays cheap
(Ray and the checkpoint stack load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ScalingConfig": "elastictrain.config",
    "FailureConfig": "elastictrain.config",
    "BatchConfig": "elastictrain.config",
    "CheckpointConfig": "elastictrain.config",
    "EncryptionConfig": "elastictrain.config",
    "RunConfig": "elastictrain.config",
    "NetworkConfig": "elastictrain.config",
    "NoticeConfig": "elastictrain.config",
    "ElasticTrainer": "elastictrain.trainer",
    "Result": "elastictrain.trainer",
    "Context": "elastictrain.runtime.context",
    "get_context": "elastictrain.runtime.context",
    "GradAccumulator": "elastictrain.accumulate",
    "ShardStream": "elastictrain.accumulate.stream",
    "as_stream": "elastictrain.accumulate.stream",
    "WorldChanged": "elastictrain.errors",
    "TrainingFailed": "elastictrain.errors",
    "TooFewWorkers": "elastictrain.errors",
    "CheckpointCorrupt": "elastictrain.errors",
    "CheckpointNotFound": "elastictrain.errors",
    "WrongKey": "elastictrain.errors",
    "KeyServiceError": "elastictrain.errors",
    "UnsupportedFormat": "elastictrain.errors",
    "StreamExhausted": "elastictrain.errors",
    "StepOrderError": "elastictrain.errors",
    "UnsupportedSource": "elastictrain.errors",
    "errors": "elastictrain.errors",
    "ChaosSchedule": "elastictrain.testing.faults",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'elastictrain' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from elastictrain.accumulate import GradAccumulator
    from elastictrain.accumulate.stream import ShardStream, as_stream
    from elastictrain.config import (
        BatchConfig,
        CheckpointConfig,
        EncryptionConfig,
        FailureConfig,
        NetworkConfig,
        NoticeConfig,
        RunConfig,
        ScalingConfig,
    )
    from elastictrain.runtime.context import Context, get_context
    from elastictrain.testing.faults import ChaosSchedule
    from elastictrain.trainer import ElasticTrainer, Result
