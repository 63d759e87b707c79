"""One event vocabulary for a run: what workers, the checkpoint manager and the driver emit.

Every event is a plain dict (it crosses process boundaries as data, and `Result.events` is a list
of them) with one type field, `kind`, and a wall-clock `time`; `KINDS` says which kinds exist, who
emits them and which facts each one always carries. `event(kind, ...)` builds one and refuses an
unknown kind or a missing fact, so a new kind is added here first, with its description.

Emitters write through an `EventSink`; the driver folds what arrives into the run log, from which
`Result.events`, `Result.history`, `Result.metrics` and the commit spans are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Protocol

Event = dict[str, Any]
"""An event: `{"kind": ..., "time": ..., **facts}`."""


@dataclass(frozen=True)
class EventKind:
    """One kind of event: who emits it, the facts it always carries, what it means."""

    source: str
    """"worker", "driver" or "checkpoint"."""
    facts: tuple[str, ...]
    doc: str


def _kinds(*rows: tuple[str, str, tuple[str, ...], str]) -> Mapping[str, EventKind]:
    return MappingProxyType({name: EventKind(source, facts, doc) for name, source, facts, doc in rows})


KINDS: Mapping[str, EventKind] = _kinds(
    # --- records every step (kept compact by the run log, not listed in Result.events) ---------
    ("metrics", "worker", ("step", "term"), "A `ctx.report` of rank 0 (or one resent by a new rank 0, `replay`)."),
    ("commit", "worker", ("term", "step", "rank"), "A step committed on a rank."),
    # --- a worker's life in the world ---------------------------------------------------------
    ("joined", "worker", ("term", "rank", "world_size", "leader"),
     "A member entered the world of a term; also `node_id`, `gpus` (GPUs the worker holds) and the node's "
     "`provider`, `region`, `zone`, `instance_type`, `accelerator` labels where the node has them."),
    ("spare_joined", "worker", ("term", "rank", "waited_s"),
     "A warm spare (`ScalingConfig.spares`), started earlier and waiting outside a full world, entered the world "
     "of a term: no process was started for it. `waited_s`: how long it waited."),
    ("left", "worker", ("term", "step"),
     "A member left the run at a step boundary (a preemption notice). With the notice known: `source` ('sigterm', "
     "'drain', or the cloud: 'aws', 'gcp', 'azure'), `notice_s` (the warning's length, None when not given) and "
     "`used_s` (seconds from the notice to this clean leave)."),
    ("cloud_notice", "worker", ("provider", "notice", "warning_s"),
     "The cloud's metadata service said this machine goes (or may soon), the moment a worker saw it: `notice` "
     "(e.g. 'spot_terminate', 'rebalance', 'preempted', 'preempt'), `warning_s` (deadline less the time seen, "
     "None without a deadline), `leave` (whether the member leaves for it), `deadline`, `summary`."),
    ("world_changed", "worker", ("term", "step", "reason"),
     "A member's world ended (a peer lost, a planned rebuild); `in_flight` names a step lost in flight."),
    ("recovered", "worker", ("term", "world_size", "resumed_from", "recovery_s"),
     "The rebuilt world committed its first step; how long it took since the failure was detected, and "
     "`phases`: seconds spent to elect, form the group, re-enter train_fn, restore, commit the first step."),
    ("in_flight_step_kept", "worker", ("term", "step"),
     "The world changed after the optimizer stepped: the step counts as committed, not redone."),
    ("preemption_notice", "worker", ("term", "step"),
     "A rank asked to leave; the world stops at this boundary (`source`, `notice_s` as for `left`)."),
    ("error", "worker", ("reason",), "The user's `train_fn` raised; the run fails with this reason."),
    ("state_sent", "worker", ("term", "step", "bytes", "seconds", "receivers"),
     "Rank 0 sent its state to members behind or new (`receivers`, their ranks); survivors at its step receive nothing."),
    ("state_disagreed", "worker", ("term", "step"),
     "Survivors at one committed step held different states (fingerprints); every rank took rank 0's."),
    ("record_rejected", "worker", ("key", "reason"),
     "An election record did not verify or parse (forged, moved, garbage) and was skipped; also from the driver. "
     "Once per key and reason."),
    ("final_save_started", "worker", ("term", "step"), "The leader began the run's last checkpoint."),
    ("restored_from_checkpoint", "worker", ("step", "checkpoint"), "No member held state: rank 0 read storage."),
    ("checkpoint_skipped", "checkpoint", ("checkpoint", "reason"),
     "A stored checkpoint could not be used (damaged, wrong key); an older one was tried."),
    ("checkpoint_deferred", "worker", ("term", "step"), "A periodic save came due while the last was in flight."),
    ("checkpoint_failed", "checkpoint", ("step", "reason"), "A save failed; training goes on and saves again."),
    # --- the checkpoint manager ---------------------------------------------------------------
    ("checkpoint", "checkpoint", ("term", "step"),
     "A checkpoint's manifest was written: it is committed (with `bytes_written`, the bytes uploaded, and the "
     "manager's `seconds`)."),
    ("retention", "checkpoint", (), "Old checkpoints, chunks or temporaries were deleted."),
    ("retention_failed", "checkpoint", ("reason",), "Deleting old checkpoints failed; they stay."),
    ("retention_skipped", "checkpoint", ("term", "reason"), "A newer term leads; its writer deletes what is old."),
    ("checkpoint_rollback", "checkpoint", ("recorded_step", "found_step"),
     "A restore found only checkpoints older than the newest committed step recorded outside the storage "
     "(deleted or rolled back by whoever can write it); `found_step` is None when none verifies."),
    # --- the driver ---------------------------------------------------------------------------
    ("world", "driver", ("term", "world_size", "leader"), "The world of a term, as its members reported joining."),
    ("worker_started", "driver", ("member",), "A worker process was asked for."),
    ("worker_lost", "driver", ("member", "reason"), "A worker process died or was killed."),
    ("worker_left", "driver", ("member", "step"), "A worker left at a step boundary and returned."),
    ("heartbeat_lapsed", "driver", ("member",), "A worker's heartbeat stopped: it was killed (hung process)."),
    ("hang_detected", "driver", ("member", "no_progress_s"),
     "A worker's training thread made no progress for `hang_timeout_s` while its heartbeat lived: killed."),
    ("node_draining", "driver", ("member", "node"), "A worker's node drains: the worker was asked to leave."),
    ("fault_injected", "driver", ("member",),
     "A callback injected a fault on a member (`RunView.signal`, `note_fault`); a `ChaosSchedule`'s carry the "
     "fault's kind (`fault`) and `index` (a fault that hits two members has two events with one index)."),
    ("stragglers_killed", "driver", ("members",), "Workers still running long after the run ended were killed."),
    ("cleanup_failed", "driver", ("reason",), "Deleting the run's keys from the cluster's store failed."),
    ("spread_unmet", "driver", ("label", "shares", "max_share", "cap"),
     "A value of the spread label (`ScalingConfig.spread_by`) holds more than `cap` workers (`max_share` of the pool): "
     "a provider vanished or lacks capacity, so replacements went where capacity is and the run went on. "
     "`shares`: each value's fraction of the placed workers; `counts`: their numbers."),
    ("spread_restored", "driver", ("label", "shares", "max_share", "cap"),
     "The spread obeys `max_share` again (capacity came back and workers moved at step boundaries)."),
    ("spread_pending", "driver", ("member", "label", "pending_s"),
     "A worker the spread steered stayed pending (unschedulable) for `pending_s`: it was stopped, and its "
     "replacement starts without the spread constraint."),
    ("spread_move", "driver", ("member", "label", "away_from", "to", "replacement"),
     "Restoring the spread: `replacement` started on `to` waits to join, and `member` on the over-share "
     "`away_from` was asked to leave at its next step boundary."),
    ("records_dropped", "driver", ("count", "reason"),
     "Records from workers that were not plain data of a kind a worker sends, with its facts' types, within "
     "size caps (`runtime.records`) were dropped; `reason` says what was wrong with the first."),
    # --- the run's event log (`fleet.report_log`), read back by `elastictrain report` ------------------
    ("log_opened", "driver", ("run",),
     "The run's event log began (`fit()` started): `run` is its id; a resubmitted job opens another log."),
    ("steps", "driver", ("term", "first", "last"),
     "Steps `first`..`last` committed by the world of `term` (compact commit records in the event log); "
     "`time` is when `last` committed, `first_time` when `first` did."),
    ("event_log_failed", "driver", ("reason",), "Writing the run's event log failed; training goes on, unlogged."),
)

QUIET_KINDS = frozenset({"metrics", "commit"})
"""Records sent in batches with the next heartbeat; every other kind is an event, sent at once."""


class UnknownEvent(ValueError):
    """An event of a kind `KINDS` does not list, or without a fact its kind always carries."""


def event(kind: str, /, **facts: Any) -> Event:
    """An event of `kind` carrying `facts`, stamped with the wall time unless `time` is given.

    Raises:
        UnknownEvent: `kind` is not in `KINDS`, or a fact its kind always carries is missing.
    """
    spec = KINDS.get(kind)
    if spec is None:
        raise UnknownEvent(f"no event kind {kind!r}; add it to elastictrain.events.KINDS with its facts")
    missing = [f for f in spec.facts if f not in facts]
    if missing:
        raise UnknownEvent(f"a {kind!r} event needs {missing}")
    facts.setdefault("time", time.time())
    return {"kind": kind, **facts}


def check(record: Mapping[str, Any]) -> None:
    """Raise `UnknownEvent` unless `record` is a well-formed event (for tests and sinks that validate)."""
    facts = {k: v for k, v in record.items() if k != "kind"}
    event(str(record.get("kind")), **facts)
    if not isinstance(record.get("time"), (int, float)):
        raise UnknownEvent(f"a {record.get('kind')!r} event has no numeric time")


class EventSink(Protocol):
    """Where an emitter's events go: the worker's queue to the driver, the driver's run log, a list."""

    def emit(self, event: Event) -> None: ...


class ListSink:
    """Keeps events in a list (a checkpoint manager with no runtime around it, tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)
