"""The run's event log: written in parts that are rewritten whole, failures reported once, read back checked."""

from __future__ import annotations

import json

import fsspec
import pytest

from elastictrain.events import event
from elastictrain.fleet import report_log
from elastictrain.fleet.report_log import EventLogWriter, check_line, read_events


@pytest.fixture
def folder():
    fs = fsspec.filesystem("memory")
    root = "/report-log-test"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def writer_into(fs, root, run="run-1", started=1000.0, **kwargs):
    return EventLogWriter(lambda name, data: fs.pipe_file(f"{root}/{name}", data), run, started, **kwargs)


def test_commits_of_every_rank_become_one_steps_line_per_term_and_flush(folder):
    fs, root = folder
    log = writer_into(fs, root)
    for step in range(3):
        for rank in range(2):
            log.add(event("commit", term=1, step=step, rank=rank, time=1001.0 + step))
    log.add(event("metrics", term=1, step=2, loss=0.5, time=1003.5))
    log.flush()
    log.add(event("commit", term=1, step=2, rank=1, time=1003.9))  # a late rank's commit of a written step
    log.add(event("commit", term=1, step=3, rank=0, time=1004.0))
    log.close()
    read = read_events(f"memory://{root}")
    steps = [(e["first"], e["last"], e["first_time"], e["time"]) for e in read.events if e["kind"] == "steps"]
    assert steps == [(0, 2, 1001.0, 1003.0), (3, 3, 1004.0, 1004.0)]
    assert [e["kind"] for e in read.events] == ["log_opened", "metrics", "steps", "steps"]
    assert read.skipped_lines == 0


def test_a_full_part_starts_the_next_and_runs_are_read_in_start_order(folder, monkeypatch):
    fs, root = folder
    monkeypatch.setattr(report_log, "PART_BYTES", 400)
    late = writer_into(fs, root, run="a-run", started=2000.0)
    late.add(event("worker_started", member="z", time=2001.0))
    late.close()
    early = writer_into(fs, root, run="b-run", started=1000.0)
    for i in range(20):
        early.add(event("worker_started", member=f"w{i}", time=1001.0 + i))
        early.flush()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(root))
    assert sum(name.startswith("b-run") for name in names) > 2  # parts of about 400 bytes
    read = read_events(f"memory://{root}")
    members = [e["member"] for e in read.events if e["kind"] == "worker_started"]
    assert members == [f"w{i}" for i in range(20)] + ["z"]  # b-run started first, parts in order


def test_a_failing_storage_is_one_event_and_the_run_goes_on():
    reasons = []

    def put(name, data):
        raise OSError("bucket gone")

    log = EventLogWriter(put, "r", 1000.0, on_failure=reasons.append)
    log.add(event("worker_started", member="a", time=1001.0))
    log.flush()
    log.add(event("worker_started", member="b", time=1002.0))
    log.flush()
    log.close()
    assert reasons == ["OSError: bucket gone"]


def test_records_over_the_line_cap_are_not_written(folder):
    fs, root = folder
    log = writer_into(fs, root)
    log.add(event("metrics", term=1, step=0, blob="x" * report_log.MAX_LINE, time=1001.0))
    log.close()
    assert log.lines_dropped == 1
    assert [e["kind"] for e in read_events(f"memory://{root}").events] == ["log_opened"]


GOOD = event("worker_lost", member="a", reason="ActorDiedError", time=5.0)


@pytest.mark.parametrize("line", [
    b"not json",
    b"[1, 2]",
    json.dumps({"kind": "no_such_kind", "time": 1.0}).encode(),
    json.dumps({"kind": "worker_lost", "member": "a", "time": 1.0}).encode(),  # its reason is missing
    json.dumps({**GOOD, "time": "yesterday"}).encode(),
    json.dumps({**GOOD, "member": 7}).encode(),
    json.dumps({"kind": "steps", "term": 1, "first": "0", "last": 9, "time": 1.0}).encode(),
    json.dumps({"kind": "steps", "term": True, "first": 0, "last": 9, "time": 1.0}).encode(),
    json.dumps({"kind": "joined", "term": 1, "rank": 0, "world_size": 1, "leader": True, "member": "a",
                "time": 1.0, "provider": {"nested": "dict"}}).encode(),
    b'{"kind": "worker_lost", "member": "a", "reason": "x", "time": Infinity}',
    b"[" * 100_000,
    json.dumps({**GOOD, "reason": "r" * report_log.MAX_LINE}).encode(),
])
def test_a_forged_or_garbage_line_is_refused(line):
    record, why = check_line(line)
    assert record is None and why


def test_the_reader_skips_and_counts_bad_lines_and_oversized_files(folder, monkeypatch):
    fs, root = folder
    good = json.dumps(GOOD).encode()
    fs.pipe_file(f"{root}/r-1.00000.jsonl", b"\n".join([good, b"garbage", b'{"kind": "steps"}', good, b""]))
    fs.pipe_file(f"{root}/huge.00000.jsonl", good * 10)
    fs.pipe_file(f"{root}/notes.txt", b"not a log")
    monkeypatch.setattr(report_log, "MAX_FILE", len(good) * 5)
    read = read_events(f"memory://{root}")
    assert read.events == [GOOD, GOOD]
    assert read.skipped_lines == 2 and read.skipped_files == 1
    assert check_line(good) == (GOOD, None)


def test_a_missing_log_is_file_not_found(folder):
    with pytest.raises(FileNotFoundError):
        read_events("memory:///no-such-log")


def test_the_cli_reports_from_a_log_and_fails_in_one_line_on_bad_input(tmp_path, capsys):
    from elastictrain.cli import main

    logs = tmp_path / "events"
    logs.mkdir()
    log = EventLogWriter(lambda name, data: (logs / name).write_bytes(data), "r", 1000.0)
    log.add(event("joined", member="a", term=1, rank=0, world_size=1, leader=True, time=1001.0))
    log.add(event("commit", term=1, step=0, rank=0, time=1002.0))
    log.close()
    (tmp_path / "bad.toml").write_text("[providers.aws]\nhourly = 3\n")
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "nothing"), "--events", str(logs), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["steps_committed"] == 1
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing"), "--events", str(logs), "--prices",
                 str(tmp_path / "bad.toml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastictrain report: BadPrices:") and "providers.aws.hourly" in err and "\n" not in err
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "no event log" in capsys.readouterr().err
