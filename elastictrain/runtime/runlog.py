"""What the driver keeps of a run's records, compacted per step.

Workers send three kinds of records: `commit` (every rank, every step), `metrics`
(rank 0's reports, and reports a new rank 0 replays after its predecessor died),
and events (losses, worlds, checkpoints: a few per failure or save). Keeping them
all would grow with ranks x steps; this log keeps commits as one step range per
term, metrics as the reports of each step's newest term, and events as they come.
Pure: no Ray.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

from elastictrain.events import event

NON_EVENT_KINDS = {"metrics", "commit", "joined"}
UNSTEPPED_KEPT = 1000
"""Reports made outside `ctx.steps` (no step number) kept: the newest ones."""


class RunLog:
    """Records of one run, folded in as they arrive; memory bounded by steps, not by ranks x steps."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.newest_step = -1
        self.newest_term = 0
        self.world_members: dict[str, dict] = {}
        self._terms: dict[int, list[int]] = {}  # term -> [first, last] committed step
        self._reports: dict[int, tuple[int, list[dict]]] = {}  # step -> (term, that term's reports of it)
        self._unstepped: deque[dict] = deque(maxlen=UNSTEPPED_KEPT)
        self._worlds: dict[int, dict] = {}
        self._lost_in_flight: set[tuple[int, int]] = set()

    def add(self, record: dict) -> Optional[dict]:
        """Fold in one record; returns it when it is an event (for callbacks), else None."""
        kind = record.get("kind")
        if kind == "commit":
            self._add_commit(int(record["term"]), int(record["step"]))
            return None
        if kind == "metrics":
            self._add_report(record)
            return None
        if kind == "joined":
            self._add_joined(record)
            return None
        if kind == "world_changed" and record.get("in_flight") is not None:
            self._lost_in_flight.add((int(record["term"]), int(record["in_flight"])))
        self.events.append(record)
        return record

    def _add_commit(self, term: int, step: int) -> None:
        span = self._terms.get(term)
        if span is None:
            self._terms[term] = [step, step]
        else:
            span[0], span[1] = min(span[0], step), max(span[1], step)
        self.newest_step = max(self.newest_step, step)

    def _add_report(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k not in ("kind", "member", "replay")}
        step = record.get("step")
        if step is None:
            self._unstepped.append(metrics)
            return
        term = int(record.get("term") or 0)
        held = self._reports.get(step)
        if record.get("replay"):
            # A new rank 0 resends what it reported as a follower: it fills a step whose report died
            # with the old rank 0, and never replaces one that arrived.
            if held is None:
                self._reports[step] = (term, [metrics])
            return
        if held is None or term > held[0]:
            self._reports[step] = (term, [metrics])  # a step computed again in a later term replaces it
        elif term == held[0]:
            held[1].append(metrics)

    def _add_joined(self, record: dict) -> None:
        term = int(record["term"])
        if term > self.newest_term:
            self.newest_term, self.world_members = term, {}
        if term == self.newest_term:
            self.world_members[record["member"]] = {
                "rank": record["rank"], "term": term, "leader": record["leader"],
                "pid": record.get("pid"), "node_id": record.get("node_id"),
            }
        world = self._worlds.get(term)
        if world is None:
            world = self._worlds[term] = event("world", time=record["time"], term=term,
                                               world_size=record["world_size"], leader=None)
        if record.get("leader"):
            world["leader"] = record["member"]

    # --- what a Result reads -------------------------------------------------

    def history(self) -> list[dict]:
        """Every kept report: those of each step's newest term in step order, then the unstepped ones."""
        out = [m for step in sorted(self._reports) for m in self._reports[step][1]]
        return out + list(self._unstepped)

    def final_metrics(self) -> dict:
        """The last report of the highest step reported (the committed end of the run, whatever arrived last)."""
        if self._reports:
            return dict(self._reports[max(self._reports)][1][-1])
        return dict(self._unstepped[-1]) if self._unstepped else {}

    def commit_spans(self) -> list[tuple[int, int, int]]:
        """(term, first step, last step) of the steps each term committed."""
        return [(term, span[0], span[1]) for term, span in sorted(self._terms.items())]

    def steps_lost_in_flight(self) -> int:
        """Steps that were in flight (begun, not committed) when their world changed, and so ran again."""
        return len(self._lost_in_flight)

    def all_events(self) -> list[dict]:
        """Events and one `world` event per term, in time order."""
        return sorted(self.events + list(self._worlds.values()), key=lambda r: r.get("time", 0.0))


def expand_commits(spans: list[tuple[int, int, int]]) -> Iterator[tuple[int, int]]:
    """(term, step) for every step each term committed."""
    for term, first, last in spans:
        for step in range(first, last + 1):
            yield term, step


def count_redone(spans: list[tuple[int, int, int]]) -> int:
    """Committed steps that a later term committed again: the sum over steps of (terms that committed it - 1)."""
    total = sum(last - first + 1 for _, first, last in spans)
    covered = 0
    end = None
    for first, last in sorted((f, l) for _, f, l in spans):
        if end is None or first > end:
            covered += last - first + 1
            end = last
        elif last > end:
            covered += last - end
            end = last
    return total - covered
