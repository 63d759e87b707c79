"""A warm spare (`ScalingConfig(spares=1)`) takes a killed member's place in the very next world, without a process
start, and a new spare is started behind it."""

from __future__ import annotations

import signal
from typing import Optional

import pytest

import elastictrain as et
from elastictrain.testing.faults import hold_until_faults
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.fault.faults import a_follower
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process, kinds

TASK = ToyTask(total_steps=30, step_sleep_s=0.05)
FAULT_STEP = 8
SPARE_WAIT_S = 120.0


class KillOnceASpareWaits:
    """At `FAULT_STEP` or later, once the world is whole (2) and a spare waits outside it, SIGKILL a follower.
    Notes each world's members (id -> pid) as the driver sees them join."""

    def __init__(self) -> None:
        self.fired_at: Optional[float] = None
        self.killed: Optional[str] = None
        self.term: Optional[int] = None
        self.spares: list[str] = []
        self.worlds: dict[int, dict[str, Optional[int]]] = {}

    def on_progress(self, view: et.RunView) -> None:
        members = view.members()
        if members:
            self.worlds.setdefault(view.term, {}).update({m: info["pid"] for m, info in members.items()})
        if self.fired_at is not None or view.step < FAULT_STEP or len(members) < 2:
            return
        waiting = view.waiting()
        if not waiting:
            return
        self.spares, self.term, self.killed = waiting, view.term, a_follower(view)
        self.fired_at = view.signal(self.killed, signal.SIGKILL)


def test_a_warm_spare_fills_the_next_world_and_a_new_spare_is_started(ray_session):
    fault = KillOnceASpareWaits()
    result = et.ElasticTrainer(
        # Every rank holds at the step after the fault's until it was fired: it lands on a whole world, with
        # the spare waiting, however slowly this machine starts the spare.
        make_train_fn(TASK, on_step=hold_until_faults(FAULT_STEP + 1, timeout_s=SPARE_WAIT_S)),
        scaling=et.ScalingConfig(min_workers=1, max_workers=2, spares=1),
        batch=BATCH, failure=FAILURE.model_copy(update={"startup_wait_s": SPARE_WAIT_S}), callbacks=[fault],
    ).fit()
    assert fault.fired_at is not None, "no spare waited outside a whole world"
    assert kinds(result).count("worker_lost") == 1

    # The very next term is back at full size, and its new member is the spare that waited at the kill.
    worlds = {e["term"]: e for e in result.events if e["kind"] == "world"}
    next_term = fault.term + 1
    assert worlds[next_term]["world_size"] == 2, worlds
    newcomers = set(fault.worlds[next_term]) - set(fault.worlds[fault.term])
    assert len(newcomers) == 1 and newcomers <= set(fault.spares), (newcomers, fault.spares)
    spare = newcomers.pop()
    assert fault.worlds[next_term][spare] not in fault.worlds[fault.term].values()  # another process than the dead one

    # No process was started for it: it was asked for before the kill, and it tells it waited as a spare.
    started = {e["member"]: e["time"] for e in result.events if e["kind"] == "worker_started"}
    assert started[spare] < fault.fired_at
    joined = [e for e in result.events if e["kind"] == "spare_joined"]
    assert [(e["member"], e["term"]) for e in joined] == [(spare, next_term)], joined
    assert joined[0]["waited_s"] > 0

    # A new spare was asked for after the loss, and no further term grew the world for it.
    assert len([m for m, t in started.items() if t > fault.fired_at]) == 1 and len(started) == 4
    assert max(term for term, _, _ in result.commit_spans) == next_term
    assert result.steps_redone <= 1
    assert_matches_one_process(result, TASK)

    # Only the spare received state, and the recovery says where its time went.
    sent = [e for e in result.events if e["kind"] == "state_sent" and e["term"] > fault.term]
    assert [(e["term"], e["receivers"]) for e in sent] == [(next_term, [1])], sent
    assert sent[0]["bytes"] > 0
    recovered = [e for e in result.events if e["kind"] == "recovered" and e["term"] == next_term]
    assert len(recovered) == 1 and set(recovered[0]["phases"]) == {"elect", "group", "reenter", "restore", "first_step"}
    assert sum(recovered[0]["phases"].values()) == pytest.approx(recovered[0]["recovery_s"], abs=1e-6)
