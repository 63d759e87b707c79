"""The run's event log: what the driver received, as JSON lines beside the checkpoints, and read back checked.

`fit()` writes every event the driver receives (those `Result.events` lists, the `joined` records with
their node labels, rank 0's `metrics`) plus compact `steps` records (the commit spans of each term, with
their times) to `<checkpoint uri>/events/` or `RunConfig.events_path`, through fsspec and the
checkpoints' `storage_options`. Object stores cannot append, so the log is written in numbered parts,
`<run id>-<start time>.<part>.jsonl`: the current part is written whole at each flush (every second
and at the end) and a new part begins once it passes `PART_BYTES`; a resubmitted job writes its own
parts in the same folder. A failing storage never fails the run: one `event_log_failed` event, then
the run goes on unlogged.

`read_events` reads every part back and keeps only well-formed lines: a known event kind with its
facts (`events.check`), plain values of sane types, within size caps per line and per file. Anything
else is skipped and counted; nothing in a log can make the reader raise or run code.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from elastictrain.events import UnknownEvent, check, event
from elastictrain.runtime.records import FACT_TYPES, NotPlain, measure

PART_BYTES = 1 << 20
"""A part is written whole at each flush; past this size the next line starts a new part."""
MAX_LINE = 64 * 1024
"""Bytes of one line; a longer record is not written, and a longer line is not read."""
MAX_FILE = 64 << 20
"""Bytes of one part read back; a larger file is skipped whole."""
MAX_FILES = 10_000
"""Parts read from one folder; the rest are skipped."""
FLUSH_EVERY_S = 1.0

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
LOG_FACT_TYPES: dict[str, tuple[type, ...]] = {
    **FACT_TYPES,
    "first": (int,),
    "last": (int,),
    "first_time": _NUMBER,
    "run": (str,),
    "gpus": _NUMBER,
    "bytes_written": (int, type(None)),
    "seconds": _OPTIONAL_NUMBER,
    "provider": (str,),
    "region": (str,),
    "zone": (str,),
    "instance_type": (str,),
    "accelerator": (str,),
    "node_id": (str, type(None)),
    "index": (int,),
    "fault": (str,),
    "waited_s": _NUMBER,
    "no_progress_s": _NUMBER,
}
"""Types of the facts a report reads; other facts may be any plain value."""
_LOOSE = {"metrics": {"step"}}  # a report's step may be any plain value, as in the run log
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def log_name(run_id: str, started: float, part: int) -> str:
    """The storage name of part `part` of the log of run `run_id` started at `started` (epoch seconds)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f".{int(started % 1 * 1000):03d}Z"
    return f"{_SAFE_NAME.sub('_', run_id)[:100] or 'run'}-{stamp}.{part:05d}.jsonl"


class EventLogWriter:
    """Folds the driver's records into log lines and writes them in parts (see the module docstring).

    Args:
        put: writes one whole object, `put(name, data)` (a `Storage.put` of one part).
        run_id: the run's id, in the file name and the first line.
        started: when the run started (epoch seconds), in the file name.
        on_failure: called once with the reason when a write fails; nothing is written after that.
        clock: monotonic seconds, for the flush interval.
    """

    def __init__(
        self, put: Callable[[str, bytes], None], run_id: str, started: float,
        on_failure: Callable[[str], None] = lambda reason: None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._put = put
        self.run_id, self.started = run_id, started
        self._on_failure = on_failure
        self._clock = clock
        self._part = 0
        self._written: list[bytes] = []  # lines of the current part already written
        self._written_bytes = 0
        self._pending: list[bytes] = []
        self._spans: dict[int, list] = {}  # term -> [first, last, first_time, last_time] not yet written
        self._logged: dict[int, int] = {}  # term -> the last step written in a `steps` line
        self._next_flush = clock() + FLUSH_EVERY_S
        self.failed: Optional[str] = None
        self.lines_dropped = 0  # records over MAX_LINE (or not JSON) not written
        self.add(event("log_opened", time=started, run=run_id))

    def add(self, record: dict) -> None:
        """Take one record the driver received: a `commit` joins its term's span, anything else is a line."""
        if self.failed is not None:
            return
        if record.get("kind") == "commit":
            self._add_commit(record)
            return
        self._add_line(record)

    def _add_commit(self, record: dict) -> None:
        term, step, when = record.get("term"), record.get("step"), record.get("time")
        if type(term) is not int or type(step) is not int or not isinstance(when, _NUMBER):
            return
        if step <= self._logged.get(term, -1):
            return  # another rank's commit of a step already written
        span = self._spans.get(term)
        if span is None:
            self._spans[term] = [step, step, when, when]
            return
        if step < span[0]:
            span[0], span[2] = step, min(span[2], when)
        if step > span[1]:
            span[1], span[3] = step, max(span[3], when)

    def _add_line(self, record: dict) -> None:
        try:
            line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
        except (TypeError, ValueError):
            self.lines_dropped += 1
            return
        if len(line) > MAX_LINE:
            self.lines_dropped += 1
            return
        self._pending.append(line)

    def maybe_flush(self) -> None:
        """Flush when `FLUSH_EVERY_S` has passed since the last flush."""
        now = self._clock()
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_EVERY_S
            self.flush()

    def flush(self) -> None:
        """Write what came since the last flush: the current part whole, and any part it filled."""
        if self.failed is not None:
            return
        for term, (first, last, first_time, last_time) in sorted(self._spans.items()):
            self._add_line(event("steps", time=last_time, term=term, first=first, last=last, first_time=first_time))
            self._logged[term] = max(self._logged.get(term, -1), last)
        self._spans.clear()
        if not self._pending and self._written:
            return
        pending, self._pending = self._pending, []
        try:
            for line in pending:
                if self._written and self._written_bytes + len(line) > PART_BYTES:
                    self._write()
                    self._part, self._written, self._written_bytes = self._part + 1, [], 0
                self._written.append(line)
                self._written_bytes += len(line)
            self._write()
        except Exception as exc:  # noqa: BLE001 - storage backends share no error base; the run goes on
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self._on_failure(self.failed)

    def _write(self) -> None:
        self._put(log_name(self.run_id, self.started, self._part), b"".join(self._written))

    close = flush


def open_event_log(spec, on_failure: Callable[[str], None]) -> tuple[Optional[EventLogWriter], Optional[str]]:
    """The writer of a run's event log and the folder it writes to, or (None, None) when the run has
    neither `RunConfig.events_path` nor a checkpoint URI. A folder that cannot be opened is a failure
    (`on_failure`), not an error."""
    folder = spec.run.events_path
    if folder is None and spec.checkpoint.uri is not None:
        folder = spec.checkpoint.uri.rstrip("/") + "/events"
    if folder is None:
        return None, None
    started = time.time()
    try:
        from elastictrain.checkpoint.storage import FsspecStorage

        storage = FsspecStorage(folder, spec.checkpoint.storage_options, attempts=2)
    except Exception as exc:  # noqa: BLE001 - a bad folder must not fail the run
        on_failure(f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        return None, folder
    return EventLogWriter(lambda name, data: storage.put(name, [data]), spec.run_id, started, on_failure), folder


# --- reading back -------------------------------------------------------------------------------


@dataclass
class LogRead:
    """What `read_events` found: the events that passed, and what was skipped and why (first reasons)."""

    events: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped_lines: int = 0
    skipped_files: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str, files: int = 0, lines: int = 0) -> None:
        self.skipped_files += files
        self.skipped_lines += lines
        if len(self.reasons) < 10:
            self.reasons.append(reason[:300])


def check_line(line: bytes) -> tuple[Optional[dict], Optional[str]]:
    """One log line as an event, or (None, why it is not one)."""
    if len(line) > MAX_LINE:
        return None, f"a line of {len(line)} bytes, over {MAX_LINE}"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON ({type(exc).__name__})"
    if type(record) is not dict:
        return None, f"a JSON {type(record).__name__}, not an object"
    try:
        measure(record)
        check(record)
    except (NotPlain, UnknownEvent, RecursionError, TypeError) as exc:
        return None, str(exc)[:200] or type(exc).__name__
    loose = _LOOSE.get(record["kind"], ())
    for name, value in record.items():
        types = LOG_FACT_TYPES.get(name)
        if types is None or name in loose:
            continue
        if not isinstance(value, types) or (type(value) is bool and bool not in types):
            return None, f"a {record['kind']!r} line whose {name!r} is a {type(value).__name__}"
        if type(value) is float and not math.isfinite(value):
            return None, f"a {record['kind']!r} line whose {name!r} is {value}"
    return record, None


def parse_lines(data: bytes, read: LogRead, where: str = "") -> list[dict]:
    """The well-formed events of one part's bytes; the rest counted in `read`."""
    out = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        record, why = check_line(line)
        if record is None:
            read.skip(f"{where}:{number}: {why}", lines=1)
        else:
            out.append(record)
    return out


def read_events(where: str, storage_options: Optional[dict] = None) -> LogRead:
    """Every well-formed event of the logs in folder `where` (all runs, `*.jsonl`), or of one log file.

    Runs are put in the order they started (their `log_opened` time), each run's lines in written order.

    Raises:
        FileNotFoundError: `where` does not exist.
    """
    import fsspec

    from elastictrain.checkpoint.credentials import resolve_options

    options = resolve_options(storage_options or {}, os.environ)
    fs, root = fsspec.core.url_to_fs(where, **options)
    if not fs.exists(root):
        raise FileNotFoundError(f"no event log at {where}")
    if fs.isfile(root):
        paths = [root]
    else:
        paths = sorted(p for p in fs.find(root) if p.endswith(".jsonl"))
    read = LogRead()
    if len(paths) > MAX_FILES:
        read.skip(f"{len(paths) - MAX_FILES} files beyond {MAX_FILES}", files=len(paths) - MAX_FILES)
        paths = paths[:MAX_FILES]
    runs: dict[str, list[dict]] = {}
    for path in paths:
        try:
            size = fs.size(path)
            if size is not None and size > MAX_FILE:
                read.skip(f"{path}: {size} bytes, over {MAX_FILE}", files=1)
                continue
            data = fs.cat_file(path)
        except OSError as exc:
            read.skip(f"{path}: {type(exc).__name__}", files=1)
            continue
        read.files.append(path)
        run = path.rsplit("/", 1)[-1].rsplit(".", 2)[0]  # the parts of one run share the name before the part
        runs.setdefault(run, []).extend(parse_lines(data, read, path.rsplit("/", 1)[-1]))
    read.events = [e for _, lines in sorted(runs.items(), key=lambda kv: (_opened(kv[1]), kv[0])) for e in lines]
    return read


def _opened(lines: Iterable[dict]) -> float:
    for record in lines:
        if record["kind"] == "log_opened":
            return float(record["time"])
    return math.inf
