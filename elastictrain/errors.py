"""Every exception elastictrain raises, named for what happened and carrying the facts."""

from __future__ import annotations


class ElasticTrainError(Exception):
    """Base class of elastictrain's errors."""


# --- runtime ---------------------------------------------------------------


class WorldChanged(ElasticTrainError):
    """The world this worker belonged to is gone; the runtime rebuilds and re-enters train_fn.

    Raised inside the user's loop at a collective or a step boundary. Users do not catch it.
    """

    def __init__(self, term: int, reason: str):
        super().__init__(f"world of term {term} changed: {reason}")
        self.term = term
        self.reason = reason


class LeaveWorld(ElasticTrainError):
    """This worker was told to leave (preemption notice, node draining) and does so at a step boundary."""


class StateRefused(ElasticTrainError, ValueError):
    """A rank refused the state its world's rank 0 broadcast (malformed, or not a state of this run's
    model); raised on every rank of the world together, so the run fails instead of training a wrong model."""


class StaleTerm(ElasticTrainError):
    """A write fenced by a term was refused because a newer term exists."""

    def __init__(self, term: int, newest: int, what: str):
        super().__init__(f"refused {what} of term {term}: term {newest} is newer")
        self.term = term
        self.newest = newest
        self.what = what


class TrainingFailed(ElasticTrainError):
    """The run cannot go on: the user's code raised, or too many failures happened."""

    def __init__(self, message: str, *, cause: str | None = None):
        super().__init__(message if cause is None else f"{message}\n{cause}")
        self.reason = message
        self.cause = cause  # the worker's traceback of the user's error, when there is one

    def __reduce__(self):  # keep `reason` and `cause` apart across processes (Ray pickles errors)
        return (_rebuild_training_failed, (type(self), self.reason, self.cause))


def _rebuild_training_failed(cls: type, reason: str, cause: str | None) -> "TrainingFailed":
    return cls(reason, cause=cause)


class TooFewWorkers(TrainingFailed):
    """Fewer than min_workers were alive for longer than the configured wait."""


class NotInWorker(ElasticTrainError):
    """A worker-only call (get_context) was made outside a worker."""


# --- data ----------------------------------------------------------------


class DataError(ElasticTrainError):
    """Base class for problems with the data that `ctx.micro_batches` reads."""


class UnsupportedSource(DataError, TypeError):
    """`micro_batches` was given something it cannot read from an exact position."""


class StepOrderError(DataError):
    """A step's micro-batches were asked for after a later step's in the same entry of train_fn."""

    def __init__(self, step: int, last_step: int):
        super().__init__(
            f"micro_batches was asked for step {step} after step {last_step} in the same entry of train_fn: "
            "an open stream only moves forward; ask for each step once, in increasing order"
        )
        self.step = step
        self.last_step = last_step

    def __reduce__(self):  # crosses the DataLoader's worker queue
        return (type(self), (self.step, self.last_step))


class StreamExhausted(DataError):
    """The stream ended before the last sample of a step's global batch (a partial batch is never trained)."""

    def __init__(self, step: int, available: int, global_batch_size: int, exact: bool = True):
        held = f"{available} samples" if exact else f"fewer than {available} samples"
        super().__init__(
            f"the stream ended before step {step} was complete: it holds {held}, and step {step} needs samples "
            f"[{step * global_batch_size}, {(step + 1) * global_batch_size}). A partial last global batch is "
            f"dropped (as drop_last does): set total_steps to at most {available // global_batch_size}, "
            "or make the stream longer (several epochs: have the shard function yield them)"
        )
        self.step = step
        self.available = available
        self.global_batch_size = global_batch_size
        self.exact = exact

    def __reduce__(self):
        return (type(self), (self.step, self.available, self.global_batch_size, self.exact))


class ShardLengthMismatch(DataError):
    """A shard read to its end held another number of samples than its declared length."""

    def __init__(self, shard: int, declared: int, actual: int):
        super().__init__(
            f"shard {shard} yielded {actual} samples but lengths[{shard}]={declared}: whole shards are skipped "
            "by their declared lengths, so fix lengths (or pass lengths=None to read every shard)"
        )
        self.shard = shard
        self.declared = declared
        self.actual = actual

    def __reduce__(self):
        return (type(self), (self.shard, self.declared, self.actual))


# --- checkpoints -----------------------------------------------------------


class CheckpointError(ElasticTrainError):
    """Base class for checkpoint problems."""


class CheckpointNotFound(CheckpointError):
    """No (valid) checkpoint exists where one was asked for."""


class CheckpointCorrupt(CheckpointError):
    """Stored bytes do not verify: tampered, truncated or missing.

    `chunk_id`: the damaged chunk's id, when the damage is in one chunk.
    """

    def __init__(self, message: str = "", chunk_id: str | None = None):
        super().__init__(message)
        self.chunk_id = chunk_id


class KeyServiceError(ElasticTrainError):
    """The key service (KMS) failed for a reason that says nothing about the checkpoint (throttling, network)."""


class WrongKey(CheckpointError):
    """The key given cannot open this checkpoint."""


class UnsupportedFormat(CheckpointError):
    """The manifest is of a format version this release cannot read."""


class KeySpecError(CheckpointError):
    """A key spec cannot be resolved (unset variable, unreadable file, bad length)."""


class StorageCredentialError(CheckpointError, ValueError):
    """A storage credential cannot be used: an `env:` reference that names no variable, or one unset here."""


class UnknownStateEntry(CheckpointError):
    """An export asked for a `ctx.state(...)` entry the checkpoint does not hold."""

    def __init__(self, name: str, entries: list[str], models: list[str], what: str = "model"):
        hint = f"models: {', '.join(models)}; " if models and what == "model" else ""
        super().__init__(
            f"the checkpoint has no state entry {name!r} ({what}): {hint}entries: {', '.join(entries) or 'none'}"
        )
        self.name = name
        self.entries = entries


class NotExportable(CheckpointError):
    """An export was asked of something that is not what it needs (a model's weights, a transformers config)."""


class OutsideJurisdiction(ElasticTrainError, ValueError):
    """The checkpoint storage (or a world member) lies outside the run's `allowed_regions`; the message
    says where it is and what to change."""


# --- reports ---------------------------------------------------------------


class BadPrices(ElasticTrainError, ValueError):
    """A prices file (`elastictrain report --prices`) that does not parse or has a wrong key or value;
    the message names the file and the line or key."""
