"""Real processes killed and hung mid-run: the run finishes, losing at most the step in flight."""

from __future__ import annotations

import signal
import time

from elastictrain.toy import ToyTask
from tests.fault.faults import At, a_follower, kill_follower, kill_leader
from tests.toy_runs import FAILURE, assert_matches_one_process, fit_toy, kinds

TASK = ToyTask(total_steps=30, step_sleep_s=0.05)


def _fit(callbacks, workers=(2, 3)):
    return fit_toy(TASK, workers=workers, callbacks=callbacks)


def _assert_same_model(result) -> None:
    assert_matches_one_process(result, TASK)


def test_sigkill_a_worker(ray_session):
    fault = At(8, kill_follower, min_members=3)
    result = _fit([fault])
    assert fault.fired_at is not None
    assert kinds(result).count("worker_lost") == 1
    assert result.recoveries, "no recovery was reported"
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_sigkill_the_leader(ray_session):
    fault = At(8, kill_leader, min_members=3)
    result = _fit([fault])
    lost = [e["member"] for e in result.events if e["kind"] == "worker_lost"]
    injected = [e["member"] for e in result.events if e["kind"] == "fault_injected"]
    assert lost == injected and len(lost) == 1
    # A new leader took over in a later term.
    later = [e for e in result.events if e["kind"] == "recovered" and e["time"] > fault.fired_at]
    assert later and result.steps_redone <= 1
    _assert_same_model(result)


def test_second_loss_during_a_rebuild(ray_session):
    def kill_two(view):
        first, second = sorted(m for m, info in view.members().items() if not info["leader"])[:2]
        view.signal(first, signal.SIGKILL)
        time.sleep(0.03)  # the survivors are electing and re-forming the group now
        view.signal(second, signal.SIGKILL)

    fault = At(8, kill_two, min_members=4)
    result = _fit([fault], workers=(2, 4))
    assert fault.fired_at is not None
    assert kinds(result).count("worker_lost") == 2
    assert result.steps_redone <= 2
    _assert_same_model(result)


def test_hung_worker_is_detected_within_the_timeout(ray_session):
    fault = At(8, lambda view: view.signal(a_follower(view), signal.SIGSTOP), min_members=3)
    result = _fit([fault])
    hung = next(e["member"] for e in result.events if e["kind"] == "fault_injected")
    changed = [e for e in result.events if e["kind"] == "world_changed" and e["time"] > fault.fired_at]
    assert changed, "nobody noticed the hung worker"
    detected_after = min(e["time"] for e in changed) - fault.fired_at
    # Whichever comes first: the collective timeout, or the heartbeat lapse the driver acts on.
    assert detected_after < FAILURE.collective_timeout_s + 2.0, detected_after
    assert any(e["kind"] == "heartbeat_lapsed" and e["member"] == hung for e in result.events)
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_same_world_size_after_a_loss_is_bitwise_identical(ray_session):
    """min = max = 2: the run waits for a replacement, so every step runs at world size 2."""
    import torch

    uninterrupted = fit_toy(TASK, workers=(2, 2))
    fault = At(8, kill_follower, min_members=2)
    interrupted = fit_toy(TASK, workers=(2, 2), callbacks=[fault])
    assert fault.fired_at is not None and kinds(interrupted).count("worker_lost") == 1
    assert {e["world_size"] for e in interrupted.events if e["kind"] == "world"} == {2}
    assert interrupted.steps_redone <= 1
    assert torch.equal(torch.tensor(interrupted.metrics["params"]), torch.tensor(uninterrupted.metrics["params"]))
