"""Real processes killed and hung mid-run: the run finishes, losing at most the step in flight."""

from __future__ import annotations

import os
import signal
import threading

import elastictrain as et
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.conftest import _wait_for
from tests.fault.faults import At, a_follower, kill_follower, kill_leader
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process, kinds

TASK = ToyTask(total_steps=16, step_sleep_s=0.05)
FAULT_STEP = 8
# The first world waits for every worker, and the loop holds at the step after the fault's until the driver
# has fired it: the fault lands mid-run in a whole world however slowly this machine runs.
WHOLE_FIRST_WORLD = FAILURE.model_copy(update={"startup_wait_s": 120.0})


def _fit(callbacks, workers=(2, 3), hold=True):
    on_step = hold_until_faults(FAULT_STEP + 1) if hold else None
    return et.ElasticTrainer(
        make_train_fn(TASK, on_step=on_step), scaling=et.ScalingConfig(min_workers=workers[0], max_workers=workers[1]),
        batch=BATCH, failure=WHOLE_FIRST_WORLD, callbacks=list(callbacks),
    ).fit()


def _assert_same_model(result) -> None:
    assert_matches_one_process(result, TASK)


def test_sigkill_a_worker(ray_session):
    fault = At(FAULT_STEP, kill_follower, min_members=3)
    result = _fit([fault])
    assert fault.fired_at is not None
    assert kinds(result).count("worker_lost") == 1
    assert result.recoveries, "no recovery was reported"
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_sigkill_the_leader(ray_session):
    fault = At(FAULT_STEP, kill_leader, min_members=3)
    result = _fit([fault])
    lost = [e["member"] for e in result.events if e["kind"] == "worker_lost"]
    injected = [e["member"] for e in result.events if e["kind"] == "fault_injected"]
    assert lost == injected and len(lost) == 1
    # A new leader took over in a later term.
    later = [e for e in result.events if e["kind"] == "recovered" and e["time"] > fault.fired_at]
    assert later and result.steps_redone <= 1
    _assert_same_model(result)


def _dies_in_the_next_rendezvous(marker: str):
    """on_step: at step 8 of the first world, rank 1 dies mid-run and rank 2 arms a second death: once it
    has joined the next term (the survivors are electing and re-forming the group), it marks `marker`
    with that term and kills itself."""

    def on_step(ctx, step):
        if ctx.term != 1 or step != 8:
            return
        if ctx.rank == 2:
            from elastictrain.election import election as election_module

            real_join = election_module.Election.join

            def join_then_die(self, term, member):
                real_join(self, term, member)
                if term > 1:
                    with open(marker, "w") as f:
                        f.write(str(term))
                    os.kill(os.getpid(), signal.SIGKILL)

            election_module.Election.join = join_then_die
        elif ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def test_second_loss_during_a_rebuild(ray_session, tmp_path):
    from elastictrain.testing.toy import make_train_fn

    marker = tmp_path / "second-death"
    result = et.ElasticTrainer(
        make_train_fn(TASK, on_step=_dies_in_the_next_rendezvous(str(marker))),
        scaling=et.ScalingConfig(min_workers=2, max_workers=4), batch=BATCH, failure=WHOLE_FIRST_WORLD,
    ).fit()
    assert marker.read_text() == "2"  # the second death landed inside the rebuild after the first
    assert kinds(result).count("worker_lost") == 2
    assert result.steps_redone <= 2
    _assert_same_model(result)


def _gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    return _wait_for(lambda: _gone(pid), timeout=timeout)


def test_hung_worker_is_detected_within_the_timeout(ray_session):
    stopped = {}

    def stop_a_follower(view):
        member = a_follower(view)
        stopped["member"], stopped["pid"] = member, view.members()[member]["pid"]
        view.signal(member, signal.SIGSTOP)

    fault = At(FAULT_STEP, stop_a_follower, min_members=3)
    result = _fit([fault])
    hung = stopped["member"]
    changed = [e for e in result.events if e["kind"] == "world_changed" and e["time"] > fault.fired_at]
    assert changed, "nobody noticed the hung worker"
    detected_after = min(e["time"] for e in changed) - fault.fired_at
    # Whichever comes first: the collective timeout, or the heartbeat lapse the driver acts on.
    assert detected_after < FAILURE.collective_timeout_s + 2.0, detected_after
    assert any(e["kind"] == "heartbeat_lapsed" and e["member"] == hung for e in result.events)
    assert any(e["kind"] == "worker_lost" and e["member"] == hung for e in result.events)
    assert _wait_gone(stopped["pid"]), "the hung worker's process was not killed"
    assert result.steps_redone <= 1
    _assert_same_model(result)


def test_a_training_thread_stuck_while_its_heartbeat_lives_is_killed(ray_session, tmp_path):
    """A rank stuck in user code (a dead data source, a deadlock): its heartbeat thread goes on beating,
    so only the progress its beats carry shows the hang."""
    from elastictrain.testing.toy import make_train_fn

    pid_file = tmp_path / "stuck-pid"

    def on_step(ctx, step):
        if ctx.term == 1 and ctx.rank == 1 and step == 8:
            pid_file.write_text(str(os.getpid()))
            threading.Event().wait(120)  # stuck; never returns in time

    failure = WHOLE_FIRST_WORLD.model_copy(update={"hang_timeout_s": FAILURE.collective_timeout_s + 2.0})
    result = et.ElasticTrainer(
        make_train_fn(TASK, on_step=on_step), scaling=et.ScalingConfig(min_workers=2, max_workers=3),
        batch=BATCH, failure=failure,
    ).fit()
    hangs = [e for e in result.events if e["kind"] == "hang_detected"]
    assert len(hangs) == 1 and hangs[0]["no_progress_s"] > failure.hang_timeout_s
    assert [e["member"] for e in result.events if e["kind"] == "worker_lost"] == [hangs[0]["member"]]
    assert not any(e["kind"] == "heartbeat_lapsed" for e in result.events)  # its heartbeat never stopped
    assert _wait_gone(int(pid_file.read_text())), "the stuck worker's process was not killed"
    _assert_same_model(result)


def test_same_world_size_after_a_loss_is_bitwise_identical(ray_session):
    """min = max = 2: the run waits for a replacement, so every step runs at world size 2."""
    import torch

    uninterrupted = _fit([], workers=(2, 2), hold=False)
    fault = At(FAULT_STEP, kill_follower, min_members=2)
    interrupted = _fit([fault], workers=(2, 2))
    assert fault.fired_at is not None and kinds(interrupted).count("worker_lost") == 1
    assert {e["world_size"] for e in interrupted.events if e["kind"] == "world"} == {2}
    assert interrupted.steps_redone <= 1
    assert torch.equal(torch.tensor(interrupted.metrics["params"]), torch.tensor(uninterrupted.metrics["params"]))
