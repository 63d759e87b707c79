"""Start or join the Ray cluster a run uses."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_START_TRIES = 3
"""Ray gives a local node 30 s (fixed) to register; a machine busy enough to miss that gets another try."""


def ensure_ray(num_cpus: int) -> bool:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local one.

    A local start never attaches to some other cluster already running on the
    machine. Returns True when this call started or joined Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return True
    for attempt in range(1, LOCAL_START_TRIES + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
            return True
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_TRIES:
                raise
            log.warning("the local Ray node did not start in time (a busy machine); starting it again")
            ray.shutdown()
    return True
