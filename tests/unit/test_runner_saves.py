"""The leader's checkpoint saves in the runtime (Runner._save, _finish): a save that did not commit is
written again; the election runs on an in-memory store, the checkpoints on memory://, no Ray."""

from __future__ import annotations

import threading
import time
import uuid

import torch

from elastictrain.checkpoint import CheckpointManager
from elastictrain.checkpoint.storage import FsspecStorage
from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.election.term import WorldPlan
from elastictrain.runtime.runner import Runner
from elastictrain.runtime.spec import RunSpec
from elastictrain.runtime.state import ElasticState
from elastictrain.runtime.world import WorldInfo


def _runner(uri: str, election: Election, async_save: bool = True) -> Runner:
    spec = RunSpec(
        run_id="r", namespace="ns", scaling=ScalingConfig(), batch=BatchConfig(global_batch_size=8),
        checkpoint=CheckpointConfig(uri=uri, every_steps=100, async_save=async_save), failure=FailureConfig(),
        run=RunConfig(),
    )
    sent: list[dict] = []
    runner = Runner("m0", lambda ctx: None, spec, election, sent.extend, {}, torch.device("cpu"))
    runner.sent = sent  # what reached the driver; events go at once, metrics and commits with the heartbeat
    return runner


def _world(term: int) -> WorldInfo:
    return WorldInfo.from_plan(WorldPlan(term=term, leader="m0", members=("m0",), steps=(0,), host="h", port=1), "m0")


def _state(step: int) -> ElasticState:
    state = ElasticState({"w": torch.full((100,), float(step))})
    state.step = step
    return state


def _events(runner: Runner) -> list[tuple]:
    return [(e["kind"], e.get("step"), e.get("term")) for e in runner.sent + runner._buffer]


def _leader(storage_class=FsspecStorage, fenced=False) -> tuple[Runner, Election]:
    """A runner leading term 1 of a fresh run, its checkpoints on memory:// through `storage_class`."""
    uri = f"memory://runner-{uuid.uuid4().hex}"
    election = Election(MemoryStore())
    assert election.claim(1, "m0")
    runner = _runner(uri, election)
    fence = (lambda term: election.is_current(term)) if fenced else None
    runner._checkpoints = CheckpointManager(runner.spec.checkpoint, storage=storage_class(uri), fence=fence,
                                            listener=runner._on_checkpoint_event)
    return runner, election


def test_a_final_save_refused_by_the_fence_is_written_again_by_the_next_term():
    runner, election = _leader(fenced=True)
    assert election.claim(2, "m1")  # a peer's loss: term 2 is claimed while term 1's final save runs
    assert runner._finish(_state(500), _world(1)) is False  # refused: join the new world
    assert election.outcome() is None
    # the same member leads term 2 (newest step, oldest member) and finishes again
    assert runner._finish(_state(500), _world(2)) is True
    assert election.outcome() == "done"
    assert [(i.step, i.term) for i in runner._checkpoints.list()] == [(500, 2)]
    assert ("checkpoint", 500, 2) in _events(runner)
    runner._close_checkpoints()


def test_a_leave_after_a_failed_async_save_of_the_same_step_saves_it_again():
    class FailingOnce(FsspecStorage):
        fail = True

        def put(self, name, parts):
            if self.fail and name.startswith("manifests/"):
                self.fail = False
                raise PermissionError("AccessDenied")  # not transient: the save fails
            super().put(name, parts)

    runner, election = _leader(FailingOnce)
    state, world = _state(100), _world(1)
    assert runner._save(state, world, wait=False) is None  # on_commit's async save of step 100
    # a preemption notice at that step's boundary: the leader saves before anyone leaves
    assert runner._save(state, world, wait=True) is None
    assert [(i.step, i.term) for i in runner._checkpoints.list()] == [(100, 1)]
    kinds = _events(runner)
    assert ("checkpoint_failed", 100, 1) in kinds and kinds[-1] == ("checkpoint", 100, 1)
    runner._close_checkpoints()


def test_an_earlier_terms_refused_save_does_not_make_the_current_term_give_up():
    class SlowChunks(FsspecStorage):
        def put(self, name, parts):
            if name.startswith("chunks/"):
                time.sleep(0.3)  # still in flight when the world changes
            super().put(name, parts)

    runner, election = _leader(SlowChunks, fenced=True)
    assert runner._save(_state(500), _world(1), wait=False) is None  # on_commit's async save, term 1
    assert election.claim(2, "m0")  # the world changes; the same member leads term 2, at the same step
    assert runner._finish(_state(500), _world(2)) is True  # term 2 is current: it saves and ends the run
    assert election.outcome() == "done"
    assert [(i.step, i.term) for i in runner._checkpoints.list()] == [(500, 2)]
    runner._close_checkpoints()


def test_a_periodic_save_due_while_the_last_one_uploads_is_deferred_not_waited_for():
    release = threading.Event()

    class HeldManifests(FsspecStorage):
        def put(self, name, parts):
            if name.startswith("manifests/"):
                release.wait(10)  # the upload of the commit is slow until the test lets it through
            super().put(name, parts)

    runner, _ = _leader(HeldManifests)
    world = _world(1)
    runner.on_commit(_state(100), world, 100)  # every_steps=100: the save of step 100 starts
    runner.on_commit(_state(200), world, 200)  # due again while step 100 still uploads
    assert runner._checkpoints.saving  # on_commit returned without waiting for it
    assert ("checkpoint_deferred", 200, 1) in _events(runner)
    runner.on_commit(_state(201), world, 201)  # still uploading: still owed, not saved twice
    release.set()
    runner._checkpoints.wait()  # the held upload lands
    runner.on_commit(_state(202), world, 202)  # the first commit after it landed takes the owed save
    runner._close_checkpoints()
    assert [i.step for i in CheckpointManager(runner.spec.checkpoint).list()] == [100, 202]
    assert [e[1] for e in _events(runner) if e[0] == "checkpoint_deferred"] == [200]


def test_a_restore_that_finds_only_older_checkpoints_reaches_the_driver_as_a_rollback_event():
    # the runner records each commit's step outside the storage (here the election's in-memory store;
    # in a run, Ray's KV store under the run's name) and a later restore compares what it finds with it
    uri = f"memory://runner-{uuid.uuid4().hex}"
    election = Election(MemoryStore())
    assert election.claim(1, "m0")
    runner = _runner(uri, election, async_save=False)
    for step in (100, 200):
        runner._save(_state(step), _world(1), wait=True)
    runner._close_checkpoints()
    FsspecStorage(uri).delete(["manifests/000000000200-00000001.json"])  # the storage rolls the run back
    sent: list[dict] = []
    again = Runner("m0", lambda ctx: None, runner.spec, election, sent.extend, {}, torch.device("cpu"))
    state = _state(0)
    again._restore_from_checkpoint(state)
    assert state.step == 100
    rollback = [e for e in sent + again._buffer if e["kind"] == "checkpoint_rollback"]
    assert [(e["recorded_step"], e["found_step"]) for e in rollback] == [(200, 100)]
    again._close_checkpoints()
