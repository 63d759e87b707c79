"""The worker actor: a thin Ray shell around `Runner`.

It installs the SIGTERM handler (a spot notice) in the actor's main thread, finds
its node's identity and labels, watches the cloud's metadata service for notices
while it runs (`fleet.notice_watch`; nothing polls off a known cloud), and runs the
runner in a method thread.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import ray
import torch

from elastictrain.election.election import Election
from elastictrain.election.ray_store import RayKVStore
from elastictrain.errors import TrainingFailed
from elastictrain.fleet.attestation import fetch_attestation
from elastictrain.fleet.notice_watch import start_notice_watch
from elastictrain.runtime.network import apply_network
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec


def warm_up(backend: str) -> None:
    """Pay a fresh process's first-use costs before it registers, not while a world waits for it.

    A new member's first group, first DDP wrap and first backward take about a
    second on a busy host; run them once on a private one-rank group.
    """
    from datetime import timedelta

    import torch.distributed as dist

    if backend != "gloo" or dist.is_initialized():
        return
    # an in-process store and the loopback interface: warming up opens no port to the network
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=10))
    finally:
        if saved is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.ones(2, 4)).sum().backward()
        dist.broadcast(torch.zeros(8, dtype=torch.uint8), src=0)  # the state header's path: JSON in a byte tensor
    finally:
        dist.destroy_process_group()


def restore_priority() -> bool:
    """Run at normal CPU priority: Ray starts workers at nice 15, which hands the
    cores to Ray's own daemons and the driver whenever they compete with training.

    Lowering niceness needs privilege (root or CAP_SYS_NICE); without it the worker
    keeps Ray's priority. Returns whether the priority is now normal.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        return os.getpriority(os.PRIO_PROCESS, 0) <= 0
    except (OSError, AttributeError):
        return False


def node_identity() -> dict:
    ctx = ray.get_runtime_context()
    labels = ctx.get_node_labels() or {}
    return {
        "node_id": ctx.get_node_id(),
        "host": ray.util.get_node_ip_address(),
        "labels": {k: (v[0] if isinstance(v, list) and v else v) for k, v in labels.items()},
        "pid": os.getpid(),
    }


@ray.remote(max_restarts=0, max_concurrency=2)
class WorkerActor:
    def __init__(self, member_id: str, spec: RunSpec, hub: Any) -> None:
        self.member_id = member_id
        self.spec = spec
        self.hub = hub
        self.node = node_identity()
        self.runner: Runner | None = None
        self._notice: float | None = None  # when SIGTERM came before the runner existed
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.node["normal_priority"] = restore_priority()
        self._network_error: str | None = None
        try:
            self.node["interface"] = apply_network(spec.network, self.node["host"])
        except RuntimeError as exc:  # reported when the run starts: the run fails with this reason
            self._network_error = str(exc)
        warm_up(spec.backend)

    def _on_sigterm(self, signum, frame) -> None:
        # Runs in the main thread; the runner leaves at its next step boundary.
        self._notice = time.time()
        if self.runner is not None:
            self.runner.request_leave(source="sigterm", received=self._notice)

    def identity(self) -> dict:
        return self.node

    def run(self, train_fn: Callable) -> dict:
        if self.spec.scaling.use_gpu and torch.cuda.is_available():
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        store = RayKVStore(self.spec.namespace)
        hub = self.hub
        election = Election(store, self.spec.secret, scope=self.spec.namespace)
        attestation = None
        if self.spec.checkpoint.uri is not None:  # only manifests carry it
            attestation = fetch_attestation(self.spec.failure.notices, self.node["labels"])
        self.runner = Runner(
            self.member_id,
            train_fn,
            self.spec,
            election,
            send=lambda records: ray.get(hub.push.remote(records)),
            node=self.node,
            device=device,
            attestation=attestation,
        )
        election.on_reject = self.runner.emit
        if self._notice is not None:
            self.runner.request_leave(source="sigterm", received=self._notice)
        if self._network_error is not None:
            self.runner.election.set_outcome(f"failed:{self._network_error}")
            raise TrainingFailed(self._network_error)
        runner = self.runner
        notices = start_notice_watch(
            self.spec.failure.notices, self.node["labels"], emit=runner.emit,
            on_leave=lambda n: runner.request_leave(source=n.provider, notice_s=n.warning_s, received=n.received),
        )
        try:
            result = runner.run()
        finally:
            if notices is not None:
                notices.stop()
        result.update(member=self.member_id, node=self.node)
        return result
