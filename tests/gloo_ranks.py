"""Run a function on every rank of a real gloo world: spawned processes on 127.0.0.1, no Ray."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, fn: Callable[[int], dict], nprocs: int, port: int, out: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.TCPStore("127.0.0.1", port, nprocs, rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=nprocs, timeout=timedelta(seconds=60))
    try:
        out[rank] = fn(rank)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int], dict], nprocs: int) -> dict[int, dict]:
    """`fn(rank)` on each of `nprocs` ranks inside an initialised default group; rank -> what it returned.
    `fn` must be a module-level function (it is pickled into the spawned processes)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(fn, nprocs, free_port(), out), nprocs=nprocs, join=True)
        return {rank: dict(value) for rank, value in out.items()}
