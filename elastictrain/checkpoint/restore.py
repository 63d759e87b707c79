"""The restore fallback: the newest checkpoint that verifies, older ones in turn when newer ones are damaged.

A damaged checkpoint is skipped with an event and not counted as kept by
retention; its damaged chunk is rewritten by the next save that needs it. One
of a format version this release does not read is not skipped: restoring an
older one in its place would roll the run back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.catalog import manifest_names, newest_bodies
from elastictrain.checkpoint.keys import Keyring
from elastictrain.checkpoint.manifest import decode_as_current, parse_manifest_name
from elastictrain.checkpoint.reader import Loaded, open_decoded, open_manifest, read_tensors
from elastictrain.checkpoint.storage import Storage
from elastictrain.errors import CheckpointCorrupt, CheckpointError, CheckpointNotFound, UnsupportedFormat, WrongKey

Into = Optional[dict[str, torch.Tensor]]


class Restorer:
    """Reads and verifies a run's checkpoints, falling back past damaged ones.

    Args:
        storage: the run's storage.
        keyring: the configured keys; None for unencrypted checkpoints.
        io_threads: parallel chunk reads.
        expected_run: the run id whose checkpoints are read (None: whichever the manifests name).
        damaged_chunks: chunk ids found damaged (shared with the writer, which rewrites them).
        failed: manifests found damaged or under a key it lacks (shared with retention).
        emit: records an event (`emit(kind, **facts)`).
        signer: a plaintext run's manifest signer; with it, plaintext manifests it did not sign are refused.
    """

    def __init__(
        self, storage: Storage, keyring: Optional[Keyring], *, io_threads: int,
        expected_run: Callable[[], Optional[str]], damaged_chunks: set[str], failed: set[str],
        emit: Callable[..., None], signer: Optional[crypto.Signer] = None,
    ):
        self.storage, self.keyring, self.io_threads, self.signer = storage, keyring, io_threads, signer
        self.expected_run = expected_run
        self.damaged_chunks, self.failed = damaged_chunks, failed
        self._emit: Callable[..., Any] = emit

    def load_manifest(self, name: str, into: Into = None) -> Loaded:
        """Read and verify the checkpoint of one manifest name (see `CheckpointManager.load_manifest`)."""
        return self._load(name, self.expected_run(), into, {})

    def latest(self, into: Into = None) -> Optional[Loaded]:
        """The newest checkpoint that verifies; None if there is none (see `CheckpointManager.latest`)."""
        names = list(reversed(manifest_names(self.storage)))
        if not names:
            return None
        skipped: list[tuple[str, str]] = []  # both passes' skipped checkpoints, reported together
        try:
            return self._first_that_verifies(names, "checkpoint", into, skipped)
        except CheckpointError:
            # another writer may have committed newer checkpoints (and retired the ones listed) meanwhile
            newer = [n for n in reversed(manifest_names(self.storage)) if n not in names]
            if not newer:
                raise
            return self._first_that_verifies(newer, "checkpoint", into, skipped)

    def load_step(self, step: int, into: Into = None) -> Loaded:
        """The checkpoint of `step`, its newest term that verifies (see `CheckpointManager.load`)."""
        all_names = manifest_names(self.storage)
        names = [n for n in reversed(all_names) if parse_manifest_name(n)[0] == step]
        if not names:
            steps = sorted({parse_manifest_name(n)[0] for n in all_names})
            raise CheckpointNotFound(f"no checkpoint of step {step} under {self.storage.uri}; steps: {steps}")
        return self._first_that_verifies(names, f"checkpoint of step {step}", into)

    def _load(self, name: str, run: Optional[str], into: Into, encrypted_runs: dict[str, bool]) -> Loaded:
        """Open and read one manifest; `encrypted_runs` caches `_encrypted_run` over one restore."""
        opened = open_manifest(self.storage, name, self.keyring, run, self.signer)
        body = opened.body
        if self.keyring is None and self.signer is None and not body.encrypted:
            if body.run not in encrypted_runs:
                encrypted_runs[body.run] = self._encrypted_run(body.run)
            if encrypted_runs[body.run]:
                # without a key nothing here can be authenticated: a plaintext manifest among encrypted ones
                # is what someone who can write to the storage would plant
                raise CheckpointCorrupt(
                    f"manifest {name} is unencrypted but its run's other checkpoints are encrypted: refused "
                    "(pass the run's key to read it)"
                )
        return read_tensors(self.storage, opened, self.io_threads, into)

    def _encrypted_run(self, run: str) -> bool:
        """Whether any readable manifest of `run` is encrypted."""
        return any(body.run == run and body.encrypted for body in newest_bodies(self.storage))

    def _first_that_verifies(
        self, names: list[str], what: str, into: Into, skipped: Optional[list[tuple[str, str]]] = None,
    ) -> Loaded:
        """The first of `names` that verifies; each one before it is appended to `skipped` with the reason."""
        run = self.expected_run()
        skipped = [] if skipped is None else skipped
        errors: list[CheckpointError] = []
        encrypted_runs: dict[str, bool] = {}
        for name in names:
            try:
                loaded = self._load(name, run, into, encrypted_runs)
            except CheckpointError as exc:
                exc = self._note_failure(name, run, exc)
                reason = f"{type(exc).__name__}: {exc}"
                skipped.append((name, reason))
                errors.append(exc)
                self._emit("checkpoint_skipped", checkpoint=name, manifest=name, reason=reason)
                continue
            loaded.skipped = skipped
            self.failed.discard(name)
            return loaded
        first = errors[0]
        more = f" (and {len(errors) - 1} older ones failed too)" if len(errors) > 1 else ""
        raise type(first)(f"no {what} verifies under {self.storage.uri}: {first}{more}") from first

    def _note_failure(self, name: str, run: Optional[str], exc: CheckpointError) -> CheckpointError:
        """Record what a failed read of `name` means for later saves; the error to report for it.

        Raises:
            UnsupportedFormat: a newer release wrote it (see `_version_damage`).
        """
        if isinstance(exc, UnsupportedFormat):
            exc = self._version_damage(name, run, exc)
        if getattr(exc, "chunk_id", None):  # rewrite it when a save needs it: content addressing
            self.damaged_chunks.add(exc.chunk_id)  # repairs every checkpoint that shares it
        if isinstance(exc, (CheckpointCorrupt, WrongKey)):  # unreadable here: not counted as kept
            self.failed.add(name)
        return exc

    def _version_damage(self, name: str, run: Optional[str], exc: UnsupportedFormat) -> CheckpointCorrupt:
        """A manifest refused as another format or version: damage if the rest verifies as this version's.

        Raises:
            UnsupportedFormat: otherwise: a newer release wrote it (say, one machine of the fleet runs a
                newer image). Restoring an older checkpoint in its place would roll the run back, and
                once this release saved past it, retention would delete it.
        """
        try:
            decoded = decode_as_current(self.storage.get(name))
            if decoded is not None:
                open_decoded(name, decoded, self.keyring, run, self.signer)
                return CheckpointCorrupt(f"manifest {name}: its format or version field is damaged ({exc})")
        except (CheckpointError, FileNotFoundError):
            pass
        raise UnsupportedFormat(
            f"{exc} ({name} under {self.storage.uri}; the checkpoints before it are not restored in its "
            f"place, which would roll the run back: upgrade elastictrain, or remove {name} to resume from "
            "the one before it)"
        ) from None
