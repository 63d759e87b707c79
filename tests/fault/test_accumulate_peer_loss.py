"""A peer that dies inside a step of a 3-rank world: every survivor's collective fails at once with a
connection error (long before the collective timeout), and no survivor's optimizer steps.

The ranks use the runtime's own group set-up and failure spreading (`init_group`, `GroupSockets`,
`is_collective_failure`, as `runtime/runner.py` does): a survivor whose collective fails severs its
group's sockets, so a survivor blocked on it fails too instead of waiting out the timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from elastictrain.accumulate import GradAccumulator
from elastictrain.election.term import WorldPlan
from datetime import timedelta

from elastictrain.runtime.process_group import GroupSockets, init_group, is_collective_failure

WORLD = 3
DYING_RANK = 2
# Long on purpose: a survivor that only learnt of the loss from the timeout would take this long.
COLLECTIVE_TIMEOUT_S = 60.0
TIMEOUT_WORDS = ("timed out", "timeout")
CONNECTION_WORDS = ("connection", "closed", "reset", "broken pipe", "by peer", "eof")


def _worker(rank: int, port: int, out_dir: str, dies_at_micro_step: int) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    plan = WorldPlan(term=1, leader="r0", members=tuple(f"r{i}" for i in range(WORLD)), steps=(0,) * WORLD,
                     host="127.0.0.1", port=port)
    sockets = GroupSockets()
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    init_group(plan, rank, backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S, device=torch.device("cpu"), store=store)
    sockets.capture()
    result: dict = {"rank": rank}
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        acc = GradAccumulator(model, opt)
        x = torch.randn(6, 4)

        def one_step(step):
            with acc.step(3) as s:
                for i, xb in enumerate(x.split(2)):
                    if rank == DYING_RANK and step == 1 and i == dies_at_micro_step:
                        os.kill(os.getpid(), signal.SIGKILL)  # a preempted machine: no goodbye
                    s.backward(model(xb).pow(2).sum(), num_items=xb.shape[0])

        one_step(0)
        committed = [p.detach().clone() for p in model.parameters()]
        momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        started = time.monotonic()
        try:
            one_step(1)
            result["error"] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            result["failed_after_s"] = time.monotonic() - started
            result["error"] = {"type": type(exc).__name__, "message": str(exc),
                               "collective_failure": is_collective_failure(exc)}
            sockets.sever()  # spread the failure, as the runner does
        result["params_unchanged"] = all(torch.equal(p, c) for p, c in zip(model.parameters(), committed))
        result["momentum_unchanged"] = all(
            torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum)
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    # Results are on disk and the group is destroyed; skip interpreter teardown, where
    # torch's gloo destructors now and then abort a loaded machine's child process.
    os._exit(0)


def _run(tmp_path, dies_at: int) -> list[dict]:
    # the rendezvous on a loopback store hosted here (the runtime's runs use a TermStore on Ray's KV store)
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                          wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, store.port, str(tmp_path), dies_at)) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=4 * COLLECTIVE_TIMEOUT_S)
        codes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store
    assert codes[DYING_RANK] == -signal.SIGKILL, codes
    assert all(codes[r] == 0 for r in range(WORLD) if r != DYING_RANK), codes
    with_results = sorted(os.listdir(tmp_path))
    assert with_results == [f"rank{r}.json" for r in range(WORLD) if r != DYING_RANK], with_results
    return [json.loads((tmp_path / name).read_text()) for name in with_results]


def test_every_survivor_fails_fast_with_a_connection_error_and_no_optimizer_step(tmp_path):
    survivors = _run(tmp_path, dies_at=2)  # the survivors reach the gradient all-reduce, the dying rank never does
    for out in survivors:
        assert out["error"] is not None, f"rank {out['rank']}'s step should have failed"
        message = out["error"]["message"].lower()
        assert out["error"]["collective_failure"], out["error"]  # the runner rebuilds, not fails the run
        assert any(w in message for w in CONNECTION_WORDS), out["error"]
        assert not any(w in message for w in TIMEOUT_WORDS), out["error"]  # detected, not waited out
        # Well below the timeout: a survivor that waited for it would take COLLECTIVE_TIMEOUT_S.
        assert out["failed_after_s"] < COLLECTIVE_TIMEOUT_S / 4, out
        assert out["params_unchanged"] and out["momentum_unchanged"], out
