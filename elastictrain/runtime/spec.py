"""What the driver hands every worker: the configs of one run, picklable."""

from __future__ import annotations

from dataclasses import dataclass

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.runtime.rendezvous import RendezvousPolicy


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    namespace: str
    scaling: ScalingConfig
    batch: BatchConfig
    checkpoint: CheckpointConfig
    failure: FailureConfig
    run: RunConfig

    @property
    def backend(self) -> str:
        return "nccl" if self.scaling.use_gpu else "gloo"

    def rendezvous_policy(self) -> RendezvousPolicy:
        f = self.failure
        return RendezvousPolicy(
            min_workers=self.scaling.min_workers,
            max_workers=self.scaling.max_workers,
            heartbeat_timeout_s=f.heartbeat_timeout_s,
            rendezvous_timeout_s=f.rendezvous_timeout_s,
            below_min_timeout_s=f.below_min_timeout_s,
            startup_wait_s=f.startup_wait_s,
        )
