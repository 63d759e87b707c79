"""Fixtures shared by every tier: each test must leave no thread, process group or Ray session behind."""

from __future__ import annotations

import os
import re
import sys
import threading
import time

import pytest

pytest_plugins = ["pytester"]


def _wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- under CI, a skip is a failure unless it is a GPU skip ------------------------------------------
# `importorskip` turns a missing S3/KMS dependency into a skip that reads as green; CI installs
# everything the suite needs except a GPU, so any other skip there means a test did not run.

_GPU_REASON = re.compile(r"\b(cuda|gpus?|nccl)\b", re.IGNORECASE)
_skips: list[tuple[str, str]] = []  # (test id, reason) of every skip outside the GPU tests


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _note_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return  # an xfail is a documented expectation, not a test that did not run
    reason = _skip_reason(report)
    if "gpu" in getattr(report, "keywords", {}) or _GPU_REASON.search(reason):
        return
    _skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module-level importorskip skips at collection


def pytest_sessionfinish(session, exitstatus):
    if _in_ci() and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _in_ci() and _skips:
        terminalreporter.section("skips are failures under CI (only GPU tests may skip)", red=True)
        for nodeid, reason in _skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("install what they need (pip install -e '.[test]'), or mark a GPU test @pytest.mark.gpu")


# --- leaks -------------------------------------------------------------------------------------------


def _started_by_python(thread: threading.Thread) -> bool:
    """False for a thread that C/C++ code started and that merely called into Python.

    Measured in Ray tests here (Ray 2.60, a fit() in a `ray_session` module): the driver's only new
    thread was `Dummy-1`, a `threading._DummyThread`, which Python creates when a thread it did not
    start (Ray's core-worker threads, logging a record through Python) first asks for
    `threading.current_thread()`. Such an entry never ends, and neither elastictrain nor a test can
    create one with `threading.Thread`; every thread they start stays checked, in Ray tests too.
    Ray's own Python threads (`PythonGCThread`, `ray_listen_error_messages`) start at `ray.init`,
    before the test, and so are in the `before` set.
    """
    return not isinstance(thread, threading._DummyThread)


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_groups(request):
    """Fail a test that leaves a thread or a torch.distributed process group running (Ray tests included)."""
    before = set(threading.enumerate())
    yield
    dist = sys.modules.get("torch.distributed")  # a test that never imported it has no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a torch.distributed process group initialised")

    def leaked():
        return [t for t in threading.enumerate() if t not in before and t.is_alive() and _started_by_python(t)]

    if not _wait_for(lambda: not leaked()):
        pytest.fail(f"test leaked threads: {[t.name for t in leaked()]}")


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_ray_session():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("a test module left a Ray session running")


class _SharedRay:
    """One local Ray session for consecutive modules that ask for it (a local start costs seconds).

    Stopped before any test that does not ask for it (it may start its own cluster, or must see no
    session), and at the end of the run, before the check that no Ray session was left running.
    """

    def __init__(self) -> None:
        self.started = False

    def get(self):
        import ray

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            self.started = True
        return ray

    def stop(self) -> None:
        if self.started:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
            self.started = False


_shared_ray = _SharedRay()


def pytest_runtest_setup(item):
    if "ray_session" not in getattr(item, "fixturenames", ()):
        _shared_ray.stop()


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray():
    yield
    _shared_ray.stop()  # torn down before _no_leaked_ray_session, which was set up first


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray session, shared with the next modules that ask for one."""
    yield _shared_ray.get()


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
