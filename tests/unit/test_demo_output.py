"""The demo's stdout filter: Ray's reports of the workers the demo killed give way to one explanation."""

from __future__ import annotations

import io
import sys
import threading

from elastictrain.demo_output import EXPLANATION, InjectedKills, KillReportFilter, explaining_injected_kills


def ray_report(pid: int) -> str:
    # As Ray's error listener prints it (colour codes included), the text shortened in the middle.
    return (f"\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system "
            f"error. Worker IP address: 127.0.0.1 Worker port: 40911 Worker PID: {pid} Worker exit type: SYSTEM_ERROR "
            "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage")


def test_reports_of_injected_kills_are_explained_once_and_others_pass():
    out = io.StringIO()
    shown = KillReportFilter(out, {101, 102})
    print("elastictrain demo: 3 workers", file=shown)
    print(ray_report(101), file=shown)
    print(ray_report(102), file=shown)
    print(ray_report(555), file=shown)  # not one of the demo's kills: a real crash stays visible
    shown.close_lines()
    lines = out.getvalue().splitlines()
    assert lines[0] == "elastictrain demo: 3 workers"
    assert lines[1] == EXPLANATION
    assert lines[2] == ray_report(555)
    assert len(lines) == 3


def test_lines_from_two_threads_are_not_mixed():
    out = io.StringIO()
    shown = KillReportFilter(out, {7})
    shown.write("main thread: half")  # a line without its end yet
    worker = threading.Thread(target=lambda: print(ray_report(7), file=shown))
    worker.start()
    worker.join()
    shown.write(" and the rest\n")
    shown.close_lines()
    assert out.getvalue().splitlines() == [EXPLANATION, "main thread: half and the rest"]


def test_stdout_is_filtered_inside_the_block_only():
    pids: set[int] = set()
    original = sys.stdout
    with explaining_injected_kills(pids) as shown:
        assert sys.stdout is shown
        pids.add(9)  # filled as the run goes
        assert 9 in shown.pids
    assert sys.stdout is original


class _View:
    def members(self):
        return {"w1": {"pid": 4321}, "w2": {"pid": None}}


def test_the_pids_of_injected_faults_are_collected():
    kills = InjectedKills()
    kills.on_event(_View(), {"kind": "fault_injected", "member": "w1", "time": 1.0})
    kills.on_event(_View(), {"kind": "fault_injected", "member": "w2", "time": 1.0})
    kills.on_event(_View(), {"kind": "worker_lost", "member": "w1", "time": 2.0})
    assert kills.pids == {4321}
