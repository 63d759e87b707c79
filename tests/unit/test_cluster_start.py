"""Starting the local Ray node: a start that times out on a busy machine is tried again, nothing else is."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from elastictrain.runtime import cluster  # noqa: E402


def _fake_init(monkeypatch, failures):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_local_start_that_timed_out_is_tried_again(monkeypatch):
    calls = _fake_init(monkeypatch, [Exception("The current node timed out during startup. This could happen")])
    assert cluster.ensure_ray(4) is True
    assert calls[1] == "shutdown" and calls[0]["num_cpus"] == calls[2]["num_cpus"] == 4 and len(calls) == 3


def test_other_start_errors_and_the_last_timeout_propagate(monkeypatch):
    _fake_init(monkeypatch, [ValueError("bad resources")])
    with pytest.raises(ValueError, match="bad resources"):
        cluster.ensure_ray(4)
    timeouts = [Exception("timed out during startup")] * cluster.LOCAL_START_TRIES
    calls = _fake_init(monkeypatch, list(timeouts))
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.ensure_ray(4)
    assert sum(1 for c in calls if c != "shutdown") == cluster.LOCAL_START_TRIES
