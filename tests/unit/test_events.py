"""One event vocabulary: every emitter builds events through `event()`, and every kind is listed once."""

from __future__ import annotations

import ast
import pathlib

import pytest

import elastictrain
from elastictrain.events import KINDS, ListSink, UnknownEvent, check, event

PACKAGE = pathlib.Path(elastictrain.__file__).parent


def test_an_event_carries_its_kind_time_and_facts():
    e = event("worker_lost", member="w1", reason="RayActorError", time=12.5)
    assert e == {"kind": "worker_lost", "member": "w1", "reason": "RayActorError", "time": 12.5}
    assert isinstance(event("retention")["time"], float)
    check(e)


def test_unknown_kinds_and_missing_facts_are_refused():
    with pytest.raises(UnknownEvent, match="no event kind 'worker_vanished'"):
        event("worker_vanished", member="w1")
    with pytest.raises(UnknownEvent, match=r"needs \['reason'\]"):
        event("worker_lost", member="w1")
    with pytest.raises(UnknownEvent, match="numeric time"):
        check({"kind": "retention", "time": "noon"})


def test_every_kind_says_who_emits_it_and_what_it_means():
    for name, spec in KINDS.items():
        assert spec.source in ("worker", "driver", "checkpoint"), name
        assert spec.doc.strip(), name


def _dict_literal_kinds(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("kind", "event") and isinstance(value, ast.Constant):
                    found.append((node.lineno, str(value.value)))
    return found


def test_the_package_builds_no_event_by_hand():
    """A dict literal with a constant "kind" bypasses the vocabulary's checks; `event()` is the one way."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "events.py":
            continue
        for line, kind in _dict_literal_kinds(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line} ({kind})")
    assert offenders == []


def test_every_kind_the_package_emits_is_listed():
    emitted = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "event"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                emitted.add(node.args[0].value)
    assert emitted and emitted <= set(KINDS), sorted(emitted - set(KINDS))


def test_a_list_sink_keeps_what_it_is_given():
    sink = ListSink()
    sink.emit(event("retention", deleted=[]))
    assert [e["kind"] for e in sink.events] == ["retention"]
