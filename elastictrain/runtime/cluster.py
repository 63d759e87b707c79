"""Start or join the Ray cluster a run uses."""

from __future__ import annotations

import os


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
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True
