"""What the driver keeps of a run's records, compacted per step.

Workers send three kinds of records: `commit` (every rank, every step), `metrics`
(rank 0's reports, and reports a new rank 0 replays after its predecessor died),
and events (losses, worlds, checkpoints: a few per failure or save). Keeping them
all would grow with ranks x steps; this log keeps commits as one step range per
term, metrics as the reports of each step's newest term, and events as they come.

Reports are kept column-wise (`ReportTable`): a report of a few numbers costs some
tens of bytes, not the few hundred of a dict with its boxed floats and ints; a
`History` turns them back into dicts when they are read.
Pure: no Ray.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from typing import Any, Iterable, Iterator, Optional

from elastictrain.events import event

NON_EVENT_KINDS = {"metrics", "commit", "joined"}
UNSTEPPED_KEPT = 1000
"""Reports made outside `ctx.steps` (no step number) kept: the newest ones."""
NOT_REPORTED = ("kind", "member", "replay")
"""Record fields that say how a report travelled, not what it reports."""
MAX_LAYOUTS = 256
"""Distinct layouts (keys and value types) stored column-wise; reports of any further layout are kept as dicts."""

_INT64 = (-(2**63), 2**63)
_RAW = 0  # layout id of reports kept as dicts


def _code(value: Any) -> str:
    """The column type a value is stored in: float, int64, bool, None, or the object itself."""
    kind = type(value)
    if kind is float:
        return "d"
    if kind is int:
        return "q" if _INT64[0] <= value < _INT64[1] else "o"
    if kind is bool:
        return "b"
    if value is None:
        return "n"
    return "o"


def _column(code: str):
    if code in ("d", "q", "b"):
        return array(code)
    return None if code == "n" else []


class ReportTable:
    """Reports stored column-wise, append-only: the reports of one layout (the same keys in the same order,
    with values of the same types) share one typed column per key (floats and ints unboxed)."""

    def __init__(self) -> None:
        self._layout_ids: dict[tuple, int] = {}
        self._layouts: list[Optional[tuple]] = [None]  # layout id -> ((key, code), ...); id 0: kept as dicts
        self._columns: list[list] = [[[]]]  # layout id -> its columns; layout 0's one column holds dicts
        self._counts: list[int] = [0]
        self._row_layout = array("I")
        self._row_index = array("q")  # row -> its index in its layout's columns

    def __len__(self) -> int:
        return len(self._row_layout)

    def append(self, items: list[tuple[Any, Any]]) -> int:
        """Store one report, given as its (key, value) pairs; returns its row number."""
        layout = tuple((key, _code(value)) for key, value in items)
        lid = self._layout_ids.get(layout)
        if lid is None:
            if len(self._layouts) > MAX_LAYOUTS:
                lid = _RAW
            else:
                lid = len(self._layouts)
                self._layout_ids[layout] = lid
                self._layouts.append(layout)
                self._columns.append([_column(code) for _, code in layout])
                self._counts.append(0)
        if lid == _RAW:
            self._columns[_RAW][0].append(dict(items))
        else:
            for (_, value), column in zip(items, self._columns[lid]):
                if column is not None:
                    column.append(value)
        self._row_layout.append(lid)
        self._row_index.append(self._counts[lid])
        self._counts[lid] += 1
        return len(self._row_layout) - 1

    def row(self, row: int) -> dict:
        """Report `row` as a new dict (changing it changes nothing here)."""
        lid, index = self._row_layout[row], self._row_index[row]
        if lid == _RAW:
            return dict(self._columns[_RAW][0][index])
        out = {}
        for (key, code), column in zip(self._layouts[lid], self._columns[lid]):
            if code == "n":
                out[key] = None
            elif code == "b":
                out[key] = bool(column[index])
            else:
                out[key] = column[index]
        return out


class History(Sequence):
    """A run's reports as `Result.history` returns them: a read-only sequence of dicts, stored column-wise.

    Each item is a new dict built when it is read; `list(history)` gives a plain list.
    """

    def __init__(self, table: ReportTable, rows: array, tail: Iterable[dict] = ()) -> None:
        self._table = table
        self._rows = rows
        self._tail = [dict(r) for r in tail]

    def __len__(self) -> int:
        return len(self._rows) + len(self._tail)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("history index out of range")
        if i < len(self._rows):
            return self._table.row(self._rows[i])
        return dict(self._tail[i - len(self._rows)])

    def __iter__(self) -> Iterator[dict]:
        for row in self._rows:
            yield self._table.row(row)
        for report in self._tail:
            yield dict(report)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (History, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"History({len(self)} reports)"


class _Held:
    """The fold of one step's reports: the term they belong to and their rows, in arrival order."""

    __slots__ = ("term", "rows")

    def __init__(self) -> None:
        self.term: Optional[int] = None
        self.rows: list[int] = []

    def add(self, term: int, replay: bool, row: int) -> None:
        if replay:
            # A new rank 0 resends what it reported as a follower: it fills a step whose report died
            # with the old rank 0, and never replaces one that arrived.
            if self.term is None:
                self.term, self.rows = term, [row]
        elif self.term is None or term > self.term:
            self.term, self.rows = term, [row]  # a step computed again in a later term replaces it
        elif term == self.term:
            self.rows.append(row)


class RunLog:
    """Records of one run, folded in as they arrive; memory bounded by steps, not by ranks x steps."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.newest_step = -1
        self.newest_term = 0
        self.world_members: dict[str, dict] = {}
        self._terms: dict[int, list[int]] = {}  # term -> [first, last] committed step
        # Every stepped report, in arrival order: its values in the table, its step, term and replay flag here.
        # Which of them a step keeps is decided when the history is read (`_kept_rows`), from these alone.
        self._table = ReportTable()
        self._row_step = array("q")
        self._odd_steps: dict[int, Any] = {}  # row -> step, for steps that are not int64 (the array holds 0)
        self._row_term = array("q")
        self._row_replay = array("b")
        self._in_step_order = True  # no report arrived for a step below an earlier report's
        self._last_step: Any = None
        self._top_step: Any = None  # the highest step reported, and the fold of its reports (final_metrics)
        self._top = _Held()
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
        items = [(k, v) for k, v in record.items() if k not in NOT_REPORTED]
        step = record.get("step")
        if not isinstance(step, (int, float)):
            # No step (a report outside `ctx.steps`), or one that does not order with numbers.
            self._unstepped.append(dict(items))
            return
        term = int(record.get("term") or 0)
        replay = bool(record.get("replay"))
        row = self._table.append(items)
        if type(step) is int and _INT64[0] <= step < _INT64[1]:
            self._row_step.append(step)
        else:
            self._row_step.append(0)
            self._odd_steps[row] = step
        self._row_term.append(term)
        self._row_replay.append(replay)
        if self._last_step is not None and step < self._last_step:
            self._in_step_order = False
        self._last_step = step
        if self._top_step is None or step > self._top_step:
            self._top_step, self._top = step, _Held()
        if step == self._top_step:
            self._top.add(term, replay, row)

    def _step_of(self, row: int) -> Any:
        step = self._odd_steps.get(row) if self._odd_steps else None
        return self._row_step[row] if step is None else step

    def _kept_rows(self) -> array:
        """Rows of the kept reports in step order: for each step, those its fold keeps (`_Held`)."""
        order: Iterable[int] = range(len(self._table))
        if not self._in_step_order:
            order = sorted(order, key=self._step_of)  # stable: a step's reports stay in arrival order
        kept = array("q")
        held, current = _Held(), None
        for row in order:
            step = self._step_of(row)
            if held.term is not None and step != current:
                kept.extend(held.rows)
                held = _Held()
            current = step
            held.add(self._row_term[row], bool(self._row_replay[row]), row)
        kept.extend(held.rows)
        return kept

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

    def history(self) -> History:
        """Every kept report: those of each step's newest term in step order, then the unstepped ones."""
        return History(self._table, self._kept_rows(), self._unstepped)

    def final_metrics(self) -> dict:
        """The last report of the highest step reported (the committed end of the run, whatever arrived last)."""
        if self._top.rows:
            return self._table.row(self._top.rows[-1])
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
