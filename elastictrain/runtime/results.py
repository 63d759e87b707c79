"""What a run gives back (`Result`) and what a callback sees of it while it runs (`RunView`)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

from elastictrain.events import event
from elastictrain.runtime.runlog import count_redone, expand_commits

if TYPE_CHECKING:
    from elastictrain.runtime.driver import Driver


@dataclass
class Result:
    """What a finished run returns.

    Attributes:
        metrics: rank 0's last report of the highest step reported: the committed end of the run,
            whatever rebuild happened near it (a new rank 0 resends reports its predecessor died with).
        steps: committed optimizer steps at the end (the final `state.step`).
        checkpoint_uri: where checkpoints went, or None.
        events: failures, rebuilds, resizes, preemptions, checkpoint fallbacks, in time order.
        history: rank 0's reports, one step after another; a step computed again keeps only the
            reports of its last computation. A read-only sequence of dicts, stored column-wise (a report
            of a few numbers costs tens of bytes); `list(result.history)` gives a plain list.
        commit_spans: (term, first step, last step) each term committed.
    """

    metrics: dict
    steps: int
    checkpoint_uri: Optional[str]
    events: list[dict]
    history: Sequence[dict] = field(default_factory=list)
    commit_spans: list[tuple[int, int, int]] = field(default_factory=list)
    steps_lost_in_flight: int = 0
    """Steps begun but not committed when their world changed, so computed again (work lost, no step applied twice)."""
    events_uri: Optional[str] = None
    """The folder the run's event log went to (`RunConfig.events_path` or `<checkpoint uri>/events`), or None."""

    def report(self, prices: Optional[str] = None, out: Optional[str] = None,
               storage_options: Optional[dict] = None) -> dict:
        """The run's report (`elastictrain.fleet.report.compute`) from its event log and checkpoints.

        Args:
            prices: a prices TOML file (`docs/reports.md`); without one, no dollars.
            out: a folder to write `report.md`, `report.json` and the PNG plots to.
            storage_options: fsspec options of the log's and checkpoints' storage.

        Raises:
            ValueError: the run wrote no event log (no checkpoint URI and no `RunConfig.events_path`).
        """
        from elastictrain.fleet.report_files import write
        from elastictrain.fleet.report_cli import build_report

        if self.events_uri is None:
            raise ValueError("this run wrote no event log: set CheckpointConfig.uri or RunConfig.events_path")
        report = build_report(self.checkpoint_uri, events=self.events_uri, prices=prices,
                              storage_options=storage_options)
        if out is not None:
            write(report, out)
        return report

    @property
    def commits(self) -> list[tuple[int, int]]:
        """(term, step) for every step each term committed."""
        return list(expand_commits(self.commit_spans))

    @property
    def recoveries(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "recovered"]

    @property
    def steps_redone(self) -> int:
        """Committed steps that had to be computed again after a failure (every replica of them was lost).

        A step lost in flight, begun and not committed, is not counted here but in `steps_lost_in_flight`.
        """
        return count_redone(self.commit_spans)

    @property
    def failures(self) -> int:
        return sum(1 for e in self.events if e["kind"] == "worker_lost")


class RunView:
    """What a callback sees of a run in progress, and the faults it may inject (local clusters)."""

    def __init__(self, driver: "Driver") -> None:
        self._driver = driver
        self._faults = 0

    @property
    def step(self) -> int:
        """The newest committed step (-1 before the first)."""
        return self._driver.log.newest_step

    @property
    def term(self) -> int:
        return self._driver.log.newest_term

    @property
    def steps_redone(self) -> int:
        """Committed steps computed again so far (`Result.steps_redone`)."""
        return count_redone(self._driver.log.commit_spans())

    @property
    def steps_lost_in_flight(self) -> int:
        """Steps begun, not committed, and computed again so far (`Result.steps_lost_in_flight`)."""
        return self._driver.log.steps_lost_in_flight()

    def latest_report(self) -> dict:
        """Rank 0's report of the highest step reported so far (what `Result.metrics` will be if the run ends now)."""
        return self._driver.log.final_metrics()

    def members(self) -> dict[str, dict]:
        """Members of the newest world: id -> {rank, term, leader, pid, node_id}."""
        return {m: dict(info) for m, info in self._driver.log.world_members.items()}

    def waiting(self) -> list[str]:
        """Live workers outside the newest world: warm spares (`ScalingConfig.spares`), or new capacity
        about to join. Judged on this process's clock, like the driver's health checks."""
        driver = self._driver
        live = driver.election.live_ids(driver.spec.failure.heartbeat_timeout_s)
        return sorted(live - set(driver.log.world_members))

    def events(self) -> list[dict]:
        """Every event so far, in arrival order."""
        return list(self._driver.log.events)

    def leader(self) -> Optional[str]:
        for member, info in self._driver.log.world_members.items():
            if info.get("leader"):
                return member
        return None

    def signal(self, member_id: str, sig: int = signal.SIGKILL, **facts: Any) -> float:
        """Send `sig` to a member's process; returns the wall time it was sent (see `note_fault`, which
        records `facts` too)."""
        pid = self._driver.log.world_members[member_id]["pid"]
        now = time.time()
        os.kill(pid, sig)
        self.note_fault(member_id, signal=int(sig), time=now, **facts)
        return now

    def note_fault(self, member_id: str, **facts: Any) -> None:
        """Record a fault injected on `member_id` (a signal, a node removed or drained): a `fault_injected`
        event, and a count in the run's store (`faults/<n>`) where a worker's loop can wait for it
        (`elastictrain.testing.faults.hold_until_faults`) instead of racing it with a step count."""
        self._faults += 1
        self._driver.election.store.put(f"faults/{self._faults:06d}", member_id.encode())
        self._driver.record(event("fault_injected", member=member_id, **facts))


class Callback(Protocol):
    """Called on the driver's thread. `on_progress` when steps commit and every quarter second;
    `on_event(view, event)`, if the callback has it, once for each event as it arrives."""

    def on_progress(self, view: RunView) -> None: ...
