"""Process groups per term: a fresh rendezvous store each time (`term_store`), timeouts of seconds.

A restarted rank that dials a dead group's store hangs or fails; giving every
term its own keys rules that out.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from elastictrain.election.term import WorldPlan
from elastictrain.election.topology import WORLD, Topology

_FAILURE_MARKERS = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "pair closure",  # gloo: "Application timeout caused pair closure", a peer silent past the timeout
    "nccl",
    "gloo",
    "socket",
    "by peer",
    "process group",
)


def init_group(plan: WorldPlan, rank: int, *, backend: str, timeout_s: float, device: torch.device,
               store: dist.Store) -> None:
    """Join the term's process group through its rendezvous `store` (a `TermStore`); collectives fail
    after `timeout_s` instead of minutes. The interface gloo and NCCL bind to was chosen when the
    worker started (`runtime.network.apply_network`)."""
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=plan.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def build_groups(topology: Topology, rank: int, *, timeout_s: float) -> dict[str, Any]:
    """The process group of every named group of `topology` that `rank` belongs to: `"world"` is the
    term's default group; every other one is created here, by every rank in the topology's order
    (creation is collective over the world). Nothing is created for a flat world."""
    groups: dict[str, Any] = {WORLD: dist.group.WORLD}
    for name in topology.names():
        if name == WORLD:
            continue
        group = dist.new_group(list(topology.ranks(name)), timeout=timedelta(seconds=timeout_s))
        if rank in topology.ranks(name):
            groups[name] = group
    return groups


def destroy_group(backend: str) -> None:
    """Leave the current group without waiting on dead peers; the next term's group is named as on a new worker."""
    try:
        _destroy(backend)
    finally:
        _reset_group_names()


def _reset_group_names() -> None:
    """torch names a process group by a per-process count that only a successful destroy resets: after an
    `init_process_group` that failed (a peer died while the group formed) a survivor would name its next
    group "1" where a new worker names it "0", and their rendezvous keys would never meet again."""
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and not dist.is_initialized() and hasattr(world, "group_count"):
        world.group_count = 0


def _destroy(backend: str) -> None:
    if not dist.is_initialized():
        return
    try:
        if backend == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
            # NCCL: a blocked communicator never returns on its own; abort it.
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is broken by definition here
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


# Where torch raises what its communication layer reports: collectives, and DDP's reducer inside backward.
_COMM_SOURCES = tuple(
    os.sep + os.path.join("torch", part) + os.sep for part in ("distributed", "autograd", os.path.join("nn", "parallel"))
)


def is_collective_failure(exc: BaseException) -> bool:
    """True when `exc` comes from the communication layer rather than from the user's code.

    torch raises a lost gloo peer as a plain RuntimeError, so one counts when its message names a
    transport problem and it was raised inside torch's distributed or autograd code; the same words
    raised by the user's code (a data loader that "timed out") stay the user's error.
    """
    dist_errors = tuple(
        getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, name)
    )
    if dist_errors and isinstance(exc, dist_errors):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        if not any(marker in text for marker in _FAILURE_MARKERS):
            return False
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and any(source in frames[-1].filename for source in _COMM_SOURCES)
    return False


def _socket_inodes() -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux: nothing to sever, failures surface by timeout instead
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out[int(name)] = target
    return out


class GroupSockets:
    """The TCP connections a process group opened, so a failure can be spread at once.

    A gloo rank blocked on a live peer never learns that another peer died: its
    peer's sockets stay open even after that peer destroyed the group. Shutting
    down the group's connected sockets makes every blocked peer fail within
    milliseconds, and each of them does the same in turn. Listening sockets are
    left alone (gloo aborts the process if its listener is shut down).
    """

    def __init__(self) -> None:
        self._before = _socket_inodes()
        self._owned: dict[int, str] = {}

    def capture(self) -> None:
        """Call right after the group formed: remember the sockets it added."""
        now = _socket_inodes()
        self._owned = {fd: ino for fd, ino in now.items() if self._before.get(fd) != ino}

    def sever(self) -> int:
        """Shut down the group's connected sockets (never others); returns how many."""
        import socket

        count = 0
        for fd, inode in self._owned.items():
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != inode:
                    continue  # closed and reused since: not ours any more
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                sock.getpeername()
                sock.shutdown(socket.SHUT_RDWR)
                count += 1
            except OSError:
                pass
            finally:
                sock.close()
        self._owned = {}
        return count
