"""Fixtures shared by every tier: each test must leave no thread, process group or Ray session behind."""

from __future__ import annotations

import threading
import time

import pytest


def _wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_groups(request):
    """Fail a test that leaves a thread or a torch.distributed process group running."""
    before = set(threading.enumerate())
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a torch.distributed process group initialised")
    if "ray_session" in request.fixturenames or "ray_cluster" in request.fixturenames:
        return  # a shared Ray session owns long-lived threads; checked at its teardown

    def leaked():
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    if not _wait_for(lambda: not leaked()):
        pytest.fail(f"test leaked threads: {[t.name for t in leaked()]}")


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_ray_session():
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("a test module left a Ray session running")


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray session shared by the tests of one module."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def s3_server(monkeypatch):
    """A real HTTP S3 (and KMS) endpoint on 127.0.0.1 (moto server) with dummy credentials; yields its URL."""
    moto_server = pytest.importorskip("moto.server")
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
