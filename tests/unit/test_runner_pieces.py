"""Pure pieces of the runner: how an entry of train_fn ended, what a checkpoint records of its machine."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from elastictrain.errors import LeaveWorld, WorldChanged
from elastictrain.runtime.runner import LEFT, RECOVERY_PHASES, USER_ERROR, WORLD_CHANGED, classify_exit, recovery_phases


@pytest.mark.parametrize("exc,kind", [
    (LeaveWorld("w1 leaves at step 4"), LEFT),
    (WorldChanged(3, "planned at step 4: capacity is waiting to join"), WORLD_CHANGED),
    (dist.DistNetworkError("Connection reset by peer"), WORLD_CHANGED),
    # the words of a lost peer, raised by the user's code and not by torch's: still the user's error
    (RuntimeError("[gloo] Application timeout caused pair closure"), USER_ERROR),
    (ValueError("bad batch at step 3"), USER_ERROR),
    (KeyError("params"), USER_ERROR),
    (ZeroDivisionError("division by zero"), USER_ERROR),
])
def test_exits_are_sorted_into_leaving_a_world_change_or_the_users_error(exc, kind):
    assert classify_exit(exc) == kind


def _raised_in(filename: str, message: str) -> RuntimeError:
    try:
        exec(compile(f"raise RuntimeError({message!r})", filename, "exec"))
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_transport_words_count_only_when_torch_distributed_raised_them():
    torch_side = os.path.join(os.sep, "site-packages", "torch", "distributed", "distributed_c10d.py")
    assert classify_exit(_raised_in(torch_side, "Connection reset by peer")) == WORLD_CHANGED
    assert classify_exit(_raised_in(torch_side, "Expected a tensor of dtype float")) == USER_ERROR
    assert classify_exit(_raised_in(os.path.join(os.sep, "home", "me", "train.py"), "Connection reset by peer")) == USER_ERROR


def test_provenance_is_the_node_and_every_label_of_it():
    from elastictrain.runtime.runner import provenance

    node = {"node_id": "n1", "host": "10.0.0.2", "labels": {"region": "eu-west", "provider": "x", "zone": 3}}
    assert provenance(node) == {"node": "n1", "host": "10.0.0.2", "region": "eu-west", "provider": "x", "zone": "3"}
    # a label cannot pass itself off as the node or host
    assert provenance({"node_id": "n1", "host": "h", "labels": {"node": "fake"}})["node"] == "n1"


def test_recovery_phases_split_the_time_from_detection_to_the_first_commit():
    marks = {"grouped": 10.5, "reentered": 10.75, "restored": 11.0}
    phases = recovery_phases(10.0, 10.25, marks, 12.0)
    assert list(phases) == list(RECOVERY_PHASES)
    assert phases == {"elect": 0.25, "group": 0.25, "reenter": 0.25, "restore": 0.25, "first_step": 1.0}
    assert sum(phases.values()) == pytest.approx(2.0)


def test_a_phase_with_no_recorded_end_reads_zero_and_its_time_falls_to_the_next():
    # no "reentered" mark, and a restore stamped before the group formed (another machine's clock)
    phases = recovery_phases(10.0, 10.25, {"grouped": 10.5, "restored": 10.4}, 11.0)
    assert phases == {"elect": 0.25, "group": 0.25, "reenter": 0.0, "restore": 0.0, "first_step": 0.5}
    assert all(v >= 0 for v in phases.values())
