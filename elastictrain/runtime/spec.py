"""What the driver hands every worker: the configs of one run, picklable."""

from __future__ import annotations

from dataclasses import dataclass, field

from elastictrain.config import (
    BatchConfig,
    CheckpointConfig,
    FailureConfig,
    NetworkConfig,
    RunConfig,
    ScalingConfig,
)
from elastictrain.runtime.rendezvous import RendezvousPolicy
from elastictrain.secret import RunSecret


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    namespace: str
    scaling: ScalingConfig
    batch: BatchConfig
    checkpoint: CheckpointConfig
    failure: FailureConfig
    run: RunConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    secret: RunSecret = field(default_factory=RunSecret.generate, repr=False)
    """Authenticates the run's election records and rendezvous values (`elastictrain.secret`)."""

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
            check_bids=True,
        )
