"""`ElasticTrainer.fit()`: the public entry point of a run.

`fit()` starts or joins Ray and steps a `Driver` (`runtime/driver.py`) to the end. The driver keeps
the pool of worker actors full, tells them about deaths, kills hung ones, and gathers their records
into a `Result`; elections, rebuilds and state hand-over happen among the workers.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Optional

from elastictrain.config import (
    BatchConfig,
    CheckpointConfig,
    FailureConfig,
    NetworkConfig,
    RunConfig,
    ScalingConfig,
)
from elastictrain.runtime.driver import Driver
from elastictrain.runtime.policy import PlacementPolicy
from elastictrain.runtime.results import Callback, Result, RunView
from elastictrain.runtime.spec import RunSpec
from elastictrain.secret import RunSecret

__all__ = ["Callback", "ElasticTrainer", "Result", "RunView", "actor_options"]


def actor_options(scaling: ScalingConfig) -> dict[str, Any]:
    """Ray actor options of one worker (see `PlacementPolicy.actor_options`)."""
    return PlacementPolicy(scaling).actor_options()


class ElasticTrainer:
    """Runs `train_fn(ctx)` on elastic Ray workers until it finishes.

    Args:
        train_fn: the training loop, written once as if nothing fails.
        scaling: how many workers, with which resources, where.
        batch: the global batch, the same at every world size.
        checkpoint: where and how often to save; a URI holding checkpoints is resumed.
        failure: detection timeouts and the failure budget.
        run: name, seed, progress output.
        callbacks: objects with `on_progress(view)`, called on the driver's thread when steps
            commit and every quarter second while the run waits, and optionally
            `on_event(view, event)`, called for each event as it arrives.

    >>> result = ElasticTrainer(train_fn, scaling=ScalingConfig(min_workers=2, max_workers=3)).fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        train_fn: Callable[..., Any],
        *,
        scaling: Optional[ScalingConfig] = None,
        batch: Optional[BatchConfig] = None,
        checkpoint: Optional[CheckpointConfig] = None,
        failure: Optional[FailureConfig] = None,
        run: Optional[RunConfig] = None,
        network: Optional[NetworkConfig] = None,
        callbacks: Optional[list] = None,
    ) -> None:
        if not callable(train_fn):
            raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
        self.train_fn = train_fn
        self.scaling = scaling or ScalingConfig()
        self.batch = batch or BatchConfig()
        self.checkpoint = checkpoint or CheckpointConfig()
        self.failure = failure or FailureConfig()
        self.run = run or RunConfig()
        self.network = network or NetworkConfig()
        self.callbacks = list(callbacks or [])
        if self.batch.global_batch_size < self.scaling.max_workers:
            raise ValueError(
                f"global_batch_size={self.batch.global_batch_size} is smaller than max_workers="
                f"{self.scaling.max_workers}, so a full world would leave some worker no sample: raise "
                f"global_batch_size to at least {self.scaling.max_workers} or lower max_workers"
            )

    def fit(self) -> Result:
        """Train to the end; returns the Result.

        Raises:
            TrainingFailed: train_fn raised, too many workers were lost, or too few
                were alive for longer than `failure.below_min_timeout_s`; or a world member ran
                outside `ScalingConfig.allowed_regions`.
            OutsideJurisdiction: the checkpoint storage lies outside `CheckpointConfig.allowed_regions`.
        """
        import ray

        from elastictrain.fleet.jurisdiction import check_bucket
        from elastictrain.runtime.cluster import ensure_ray

        check_bucket(self.checkpoint)  # a bucket outside the jurisdiction policy: refused before any training

        # Room for every worker, spares included, plus the driver's helpers, even on a small machine.
        pool = self.scaling.max_workers + self.scaling.spares
        cpus = max(os.cpu_count() or 1, int(pool * self.scaling.resources_per_worker.get("CPU", 1)) + 1)
        started_ray = ensure_ray(cpus)
        try:
            return self._driver().run()
        finally:
            if started_ray:
                ray.shutdown()

    def _driver(self) -> Driver:
        """The driver of one fit(): a run spec with a fresh namespace, the election on Ray's KV store,
        Ray actors for the workers."""
        from elastictrain.election.election import Election
        from elastictrain.election.ray_store import RayKVStore
        from elastictrain.fleet.metrics import maybe_run_metrics
        from elastictrain.runtime.ray_workers import RayWorkers

        run_id = self.run.name or uuid.uuid4().hex[:12]
        spec = RunSpec(
            run_id=run_id,
            namespace=f"elastictrain/{run_id}/{uuid.uuid4().hex[:8]}",
            scaling=self.scaling,
            batch=self.batch,
            checkpoint=self.checkpoint,
            failure=self.failure,
            run=self.run,
            network=self.network,
            secret=RunSecret.for_run(self.network, self.checkpoint),
        )
        workers = RayWorkers(spec, self.train_fn)
        election = Election(RayKVStore(spec.namespace), spec.secret, scope=spec.namespace)
        return Driver(spec, workers, election, callbacks=[*self.callbacks, *maybe_run_metrics(spec)])
