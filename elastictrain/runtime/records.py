"""What the driver takes from workers: plain data of known shape, checked before it is folded in.

Workers send records (reports and events) through the hub and return a small dict when their run
ends. The driver believes neither blindly: a record must be a dict of plain values (str, int,
float, bool, None, lists and dicts of them, within size caps), of a kind `events.KINDS` lists as
one a worker or its checkpoint manager sends, with the facts its kind carries, of the types the
run log relies on. What fails is dropped, and the driver says so with one `records_dropped` event
per batch; a malformed run result counts as a lost worker. Nothing here can raise on bad input.
Pure: no Ray, no torch.
"""

from __future__ import annotations

from typing import Any, Optional

from elastictrain.events import KINDS, Event, event

MAX_STRING = 64 * 1024
"""Characters in one string of a record (a key or a value)."""
MAX_RECORD_SIZE = 4 * 1024 * 1024
"""A record's size, counted as its strings' characters plus 8 per number and per container item."""
MAX_DEPTH = 32
"""Nesting of lists and dicts in a record."""
WORKER_SOURCES = ("worker", "checkpoint")
RESULT_STATUSES = ("finished", "ended", "left")

_INT = (int,)
_NUMBER = (int, float)
_OPTIONAL_INT = (int, type(None))
FACT_TYPES: dict[str, tuple[type, ...]] = {
    "time": _NUMBER,
    "term": _OPTIONAL_INT,
    "step": _OPTIONAL_INT,
    "rank": _INT,
    "world_size": _INT,
    "leader": (bool,),
    "member": (str,),
    "reason": (str,),
    "checkpoint": (str,),
    "in_flight": _OPTIONAL_INT,
    "resumed_from": _OPTIONAL_INT,
    "recovery_s": _NUMBER,
    "replay": (bool,),
    "warning_s": (int, float, type(None)),
    "notice_s": (int, float, type(None)),
    "used_s": (int, float, type(None)),
}
"""Types of the facts the driver reads; a fact not named here may be any plain value."""
_LOOSE = {"metrics": {"step"}}  # a report's step may be any plain value (the run log keeps odd ones aside)


class NotPlain(ValueError):
    """A value that is not plain data within the caps."""


def measure(value: Any, budget: int = MAX_RECORD_SIZE, depth: int = 0) -> int:
    """The size of a plain value (see `MAX_RECORD_SIZE`); raises `NotPlain` for anything else or over `budget`."""
    if depth > MAX_DEPTH:
        raise NotPlain(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind is str:
        if len(value) > MAX_STRING:
            raise NotPlain(f"a string of {len(value)} characters, over {MAX_STRING}")
        size = len(value)
    elif kind in (int, float, bool) or value is None:
        size = 8
    elif kind is list:
        size = 8
        for item in value:
            size += 8 + measure(item, budget - size, depth + 1)
            if size > budget:
                break
    elif kind is dict:
        size = 8
        for key, item in value.items():
            if type(key) is not str:
                raise NotPlain(f"a dict key of type {type(key).__name__}")
            size += 8 + measure(key, budget - size, depth + 1) + measure(item, budget - size, depth + 1)
            if size > budget:
                break
    else:
        raise NotPlain(f"a {kind.__name__}, not plain data")
    if size > budget:
        raise NotPlain(f"over {MAX_RECORD_SIZE} in size")
    return size


def check_record(record: Any) -> Optional[str]:
    """Why `record` is not one the driver takes from a worker, or None when it is."""
    if type(record) is not dict:
        return f"a {type(record).__name__}, not a dict"
    try:
        measure(record)
    except NotPlain as exc:
        return str(exc)
    except RecursionError:
        return "nested too deep"
    kind = record.get("kind")
    spec = KINDS.get(kind) if isinstance(kind, str) else None
    if spec is None or spec.source not in WORKER_SOURCES:
        return f"kind {str(kind)[:60]!r} is not one a worker sends"
    missing = [f for f in (*spec.facts, "time") if f not in record]
    if missing:
        return f"a {kind!r} record without {missing}"
    loose = _LOOSE.get(kind, ())
    for name, value in record.items():
        types = FACT_TYPES.get(name)
        if types is None or name in loose:
            continue
        if not isinstance(value, types) or (type(value) is bool and bool not in types):
            return f"a {kind!r} record whose {name!r} is a {type(value).__name__}"
    return None


def accept_records(records: Any) -> tuple[list[Event], Optional[Event]]:
    """The records of a pull that the driver takes, and a `records_dropped` event for the rest (or None)."""
    if type(records) is not list:
        return [], event("records_dropped", count=1, reason=f"a pull gave a {type(records).__name__}, not a list")
    kept, dropped, first = [], 0, None
    for record in records:
        reason = check_record(record)
        if reason is None:
            kept.append(record)
            continue
        dropped += 1
        if first is None:
            member = record.get("member") if type(record) is dict else None
            first = reason if not isinstance(member, str) else f"from {member[:80]!r}: {reason}"
    if not dropped:
        return kept, None
    return kept, event("records_dropped", count=dropped, reason=first)


def check_result(out: Any) -> Optional[str]:
    """Why a worker's run result is not one the driver takes (None when it is): a dict whose `status` is
    one of `RESULT_STATUSES` and whose `step` is an int or None."""
    if type(out) is not dict:
        return f"a {type(out).__name__}, not a dict"
    if out.get("status") not in RESULT_STATUSES:
        return f"status {str(out.get('status'))[:60]!r}"
    step = out.get("step")
    if step is not None and type(step) is not int:
        return f"step of type {type(step).__name__}"
    return None


def clip(text: Any, limit: int = MAX_STRING) -> str:
    """A worker's string for the driver's events, cut to `limit` characters."""
    text = text if type(text) is str else f"(a {type(text).__name__})"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def to_plain(value: Any, path: str = "metrics") -> Any:
    """`value` as plain data a worker may send: tensors and numpy values become numbers or lists
    (their `tolist()`), tuples become lists; dict keys must be strings.

    Raises:
        TypeError: a value that is none of these; the message names where it is.
    """
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return value
    if kind in (list, tuple):
        return [to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path} has a key {key!r}; report dicts keyed by strings")
            out[key] = to_plain(item, f"{path}[{key!r}]")
        return out
    if isinstance(value, (str, int, float)):  # a subclass (an enum, a numpy float64): its plain value
        return (str if isinstance(value, str) else float if isinstance(value, float) else int)(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # torch tensors, numpy arrays and scalars
        return to_plain(tolist(), path)
    raise TypeError(f"{path} is a {kind.__name__}; report numbers, strings, bools, None, "
                    "tensors, and lists and dicts of them")
