"""The driver's progress display: a bar on a terminal, plain lines elsewhere, closed with the run."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastictrain.election.election import Election
from elastictrain.election.store import MemoryStore
from elastictrain.events import event
from elastictrain.fleet.progress import ProgressDisplay
from elastictrain.runtime.driver import Driver
from elastictrain.runtime.spec import RunSpec
from tests.unit.test_driver import Clock, FakeWorkers


class Terminal(io.StringIO):
    def isatty(self):
        return True


@dataclass
class View:
    step: int = -1
    world: list = field(default_factory=lambda: ["a", "b", "c"])
    loss: float = 0.75

    def members(self):
        return {m: {} for m in self.world}

    def latest_report(self):
        return {"step": self.step, "loss": self.loss}


def _run(display, clock):
    """Ten steps in 2 s, a loss and a recovery, five more steps, a stall, the end."""
    view = View()
    display.on_progress(view)
    clock.now += 2.0
    view.step = 9
    display.on_progress(view)
    display.on_event(view, event("worker_lost", member="a", reason="ActorDiedError"))
    display.on_event(view, event("recovered", term=2, world_size=2, resumed_from=10, recovery_s=0.3))
    clock.now += 0.1
    view.step, view.world, view.loss = 14, ["b", "c"], 0.25
    display.on_progress(view)  # within a second of the last line
    clock.now += 1.5
    display.on_progress(view)  # a stall: the rate falls
    clock.now += 1.4
    display.on_progress(view)
    display.close()
    display.close()  # a second close does nothing


def test_a_terminal_gets_a_bar_with_the_run_facts_finished_at_close():
    out, clock = Terminal(), Clock()
    display = ProgressDisplay(global_batch_size=8, total=15, stream=out, clock=clock)
    assert display.terminal
    _run(display, clock)
    text = out.getvalue()
    assert "\r" in text and "|##########|" in text  # drawn in place, with a bar (ASCII: the stream has no encoding)
    final = text.rstrip("\n").split("\r")[-1]
    assert "100%" in final and "15/15" in final
    assert "world 2" in final and "loss 0.25" in final and "lost 1" in final and "recoveries 1" in final
    assert "samples/s" in final
    assert text.endswith("\n")  # the finished bar stays, the cursor on a new line
    assert display._bar is None


def test_a_plain_stream_gets_lines_at_most_every_second_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(global_batch_size=8, total=15, stream=out, clock=clock)
    assert not display.terminal
    _run(display, clock)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "%|" not in out.getvalue()
    assert lines == [
        "[elastictrain] step 0/15 | world 3 | loss 0.75 | lost 0 | recoveries 0",
        "[elastictrain] step 10/15 | world 3 | 40 samples/s | loss 0.75 | lost 0 | recoveries 0",
        # the third update came 0.1 s after the second line: shown with the next, 1.5 s later, at its rate
        "[elastictrain] step 15/15 | world 2 | 33.33 samples/s | loss 0.25 | lost 1 | recoveries 1",
        # the last update changed the rate only: no line; the run's end shows it (15 steps x 8 in 5 s)
        "[elastictrain] run ended at step 15/15 | world 2 | 24 samples/s | loss 0.25 | lost 1 | recoveries 1",
    ]


def test_the_driver_shows_progress_on_stderr_and_closes_it_with_the_run(capsys):
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(min_workers=1, max_workers=2),
                   batch=BatchConfig(global_batch_size=8), checkpoint=CheckpointConfig(),
                   failure=FailureConfig(), run=RunConfig(progress=True, progress_total=3))
    workers, clock = FakeWorkers(), Clock()
    driver = Driver(spec, workers, Election(MemoryStore()), clock=clock)
    driver.start()
    workers.records += [event("commit", term=1, step=s, rank=0) for s in range(3)]
    clock.now += 1.0
    driver.step()
    driver.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[elastictrain] step 3/3 | world 0")
    assert err[-1].startswith("[elastictrain] run ended at step 3/3")
    assert driver.progress._closed


def test_no_display_without_progress():
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(min_workers=1, max_workers=2),
                   batch=BatchConfig(global_batch_size=8), checkpoint=CheckpointConfig(),
                   failure=FailureConfig(), run=RunConfig())
    driver = Driver(spec, FakeWorkers(), Election(MemoryStore()), clock=Clock())
    assert driver.progress is None and driver.callbacks == []
