"""The network a run exposes, on a real local Ray cluster: a stranger reaching this machine through its
own non-loopback address finds no port of the leading worker that reads or writes the rendezvous."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import elastictrain as et
from elastictrain.runtime.network import interface_addresses
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.conftest import _wait_for
from tests.toy_runs import BATCH, FAILURE

TASK = ToyTask(total_steps=8)
HOLD_STEP = 3
WAIT_S = 120.0

# A stranger's attempts, run in a process of its own so a server that never answers costs at most the
# timeout: on each port, connect, then speak the TCPStore protocol, read what it holds and write a key.
_PROBE = r"""
import json, socket, sys
from datetime import timedelta
import torch.distributed as dist
host = sys.argv[1]
for port in map(int, sys.argv[2:]):
    out = {"port": port, "connected": False, "read": None, "wrote": False}
    try:
        socket.create_connection((host, port), timeout=2).close()
        out["connected"] = True
        store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=3), wait_for_workers=False)
        out["read"] = store.num_keys()
        store.set("stranger", b"x")
        out["wrote"] = True
    except Exception as exc:
        out["error"] = type(exc).__name__
    print(json.dumps(out), flush=True)
"""


def external_address() -> str:
    """This machine's own non-loopback IPv4 address (tests never target another host)."""
    for name, addrs in sorted(interface_addresses().items()):
        for addr in addrs:
            if name != "lo" and "." in addr and not addr.startswith("127."):
                return addr
    pytest.fail("this machine has no non-loopback IPv4 address to probe through")


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (its sockets' inodes matched in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def probe(host: str, ports: list[int]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", _PROBE, host, *map(str, ports)], capture_output=True, text=True,
                          timeout=60 + 10 * len(ports))
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_probe_reads_and_writes_an_open_tcp_store():
    """The stranger's probe is able to fail the test below: against a TCPStore listening on every interface
    (what each term's leader opened before), it connects through the external address, reads and writes."""
    store = dist.TCPStore("0.0.0.0", 0, None, True, wait_for_workers=False)
    try:
        store.set("elastictrain/term1/0//cpu//0/0", b"rank 0's address")
        (out,) = probe(external_address(), [store.port])
        assert out["connected"] and out["read"] == 1 and out["wrote"], out
    finally:
        del store


def test_a_stranger_reaches_no_rendezvous_port_of_the_leader(ray_session, tmp_path):
    pid_file, release = tmp_path / "leader.pid", tmp_path / "release"

    def on_step(ctx, step: int) -> None:
        if step != HOLD_STEP or ctx.term != 1:
            return
        if ctx.rank == 0:
            pid_file.write_text(str(os.getpid()))
        deadline = time.monotonic() + WAIT_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # every rank holds the world formed while the stranger probes

    result: dict = {}

    def fit() -> None:
        try:
            result["result"] = et.ElasticTrainer(
                make_train_fn(TASK, on_step=on_step),
                scaling=et.ScalingConfig(min_workers=2, max_workers=2),
                batch=BATCH,
                failure=FAILURE.model_copy(update={"hang_timeout_s": 600.0}),
                network=et.NetworkConfig(interface="lo"),
            ).fit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    runner = threading.Thread(target=fit)
    runner.start()
    try:
        assert _wait_for(pid_file.exists, timeout=WAIT_S), "the leader never reached the held step"
        pid = int(pid_file.read_text())
        ports = listening_ports(pid)
        host = external_address()
        probes = probe(host, ports)
    finally:
        release.write_text("go")
        runner.join(timeout=WAIT_S)
    assert not runner.is_alive(), "the run did not finish after the probe"
    assert "error" not in result, result.get("error")
    assert ports, "the leader listens on no port at all: the probe saw nothing to try"
    assert [p["port"] for p in probes] == ports, probes
    leaks = [p for p in probes if p["read"] is not None or p["wrote"]]
    assert not leaks, f"a stranger read or wrote through the leader's ports: {leaks}"
    assert result["result"].steps == TASK.total_steps
