"""CheckpointManager: the runtime's one handle on checkpoints, composed of one part per idea.

When to save (`policy`), the async saver thread (`saver`), the run's id and keys
(`identity`), writing (`writer`), retention (`retention_runner`) and the restore
fallback (`restore`); every event of theirs goes through `_event`.

>>> mgr = CheckpointManager(CheckpointConfig(uri="memory://doc-run", async_save=False))
>>> mgr.save({"w": torch.ones(2)}, {"__tensor__": "w"}, step=1, term=0)
>>> mgr.latest().step
1
>>> mgr.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.catalog import CheckpointInfo, describe_checkpoints, manifest_names
from elastictrain.checkpoint.credentials import scrub, scrub_error
from elastictrain.checkpoint.identity import RunIdentity
from elastictrain.checkpoint.keys import Keyring, keyring_from_specs, resolve_secret
from elastictrain.checkpoint.manifest import manifest_name
from elastictrain.checkpoint.newest import KVNewestStep, NewestStep, RecordedStep
from elastictrain.checkpoint.policy import SavePolicy
from elastictrain.checkpoint.provenance import check_attestation, check_lineage
from elastictrain.checkpoint.reader import Loaded
from elastictrain.checkpoint.restore import Restorer
from elastictrain.checkpoint.retention_runner import STALE_TEMP_S, RetentionRunner
from elastictrain.checkpoint.saver import BackgroundSaver
from elastictrain.checkpoint.snapshot import Snapshotter
from elastictrain.checkpoint.storage import FsspecStorage, Storage
from elastictrain.checkpoint.trust import Checked, ManifestVerifier
from elastictrain.checkpoint.writer import ChunkWriter, Layout, RunKeys, SaveReport, plan_layout
from elastictrain.config import CheckpointConfig
from elastictrain.errors import CheckpointError
from elastictrain.election.store import KVStore
from elastictrain.events import event

if TYPE_CHECKING:
    from elastictrain.secret import RunSecret

__all__ = ["STALE_TEMP_S", "CheckpointInfo", "CheckpointManager"]

_OLD_NAMES = {"checkpoint": "saved", "checkpoint_failed": "save_failed"}
"""Kinds the manager's events had before they joined the run's vocabulary (the deprecated "event" key)."""

log = logging.getLogger("elastictrain.checkpoint")


class CheckpointManager:
    """Saves and restores one run's checkpoints under `config.uri`.

    Events (`events`, and `listener`) are dicts: `kind` (say "saved", "save_failed", "checkpoint_skipped",
    "retention"), `time`, and the facts of that kind. They also carry the same type under `event`, the
    old name of the field, which a later release removes.

    Args:
        config: where, how often, how many to keep, encryption.
        fence: called with a save's term right before its manifest is written; False abandons the save.
        provenance: labels stored in each manifest (node, host, provider, region).
        attestation: the saving node's signed identity from its cloud, stored in each manifest
            (`elastictrain.checkpoint.provenance`); None: none.
        listener: called with each event as it happens (on the saving thread): the runtime reports a
            commit the moment its manifest is written, not when the training thread next looks.
        newest_store: a key-value store outside the checkpoint storage (`elastictrain.election.store.KVStore`;
            in a run, Ray's, under a namespace stable for the run's name) where each commit's step is
            recorded; `latest()` compares what it finds with it (a `checkpoint_rollback` event and a warning
            when only older checkpoints verify). None: no record.
        run_secret: authenticates that record when the checkpoint config holds no local key (a `kms:` key
            without `signing_key`, or unsigned plaintext): `elastictrain.secret.RunSecret`.
        storage, environ, clock, random_bytes: for tests (a storage double, the variables that key specs
            and 'env:' storage credentials name, time, and the source of run ids, data keys and nonces).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        fence: Optional[Callable[[int], bool]] = None,
        provenance: Optional[dict] = None,
        attestation: Optional[dict] = None,
        listener: Optional[Callable[[dict], None]] = None,
        newest_store: Optional[KVStore] = None,
        run_secret: Optional["RunSecret"] = None,
        storage: Optional[Storage] = None,
        environ: Optional[dict] = None,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ):
        if config.uri is None and storage is None:
            raise ValueError("CheckpointConfig.uri is unset: give a URI such as file:///tmp/run1 or s3://bucket/run1")
        self.config = config
        self.storage: Storage = storage or FsspecStorage(
            config.uri, config.storage_options, fsync=config.fsync, environ=environ
        )
        self._secrets: list[str] = list(getattr(self.storage, "secrets", ()))  # hidden in events and errors
        self.keyring = _keyring(config, environ, random_bytes)
        # a plaintext run's manifest signer (CheckpointConfig.signing_key); encrypted runs sign through the keyring
        self.signer = crypto.Signer(resolve_secret(config.signing_key, environ)) if config.signing_key else None
        self.newest_step: Optional[NewestStep] = _newest_step(
            newest_store, config, storage, self.keyring, self.signer, run_secret
        )
        self.fence = fence
        self.listener = listener
        self.provenance = {"host": socket.gethostname(), **{str(k): str(v) for k, v in (provenance or {}).items()}}
        self.attestation = check_attestation(dict(attestation or {}))  # a bad one fails here, not at a save
        self.events: list[dict[str, Any]] = []
        self.reports: list[SaveReport] = []
        self._clock, self._random = clock, random_bytes
        self._closed = False
        self._compose()

    def _compose(self) -> None:
        """Build the parts; `failed` (manifests a restore could not read) is shared by restore and retention."""
        cfg = self.config
        self._chunk_size = cfg.chunk_size_mb * 1024 * 1024
        self._policy = SavePolicy(cfg.every_steps, cfg.every_seconds, self._clock())
        self._saver = BackgroundSaver()
        self._snapshotter = Snapshotter(self._chunk_size)
        self._writer = ChunkWriter(self.storage, cfg.io_threads)
        self._identity = RunIdentity(self.storage, self.keyring, self._random, self.signer)
        self._verifier = ManifestVerifier(self.keyring, self.signer, self._identity.expected_run)
        failed: set[str] = set()
        self._retention = RetentionRunner(
            self.storage, self._writer, self._verifier, keep_last=cfg.keep_last, io_threads=cfg.io_threads,
            fence=self.fence, failed=failed, emit=self._event, clock=self._clock,
        )
        self._restorer = Restorer(
            self.storage, self.keyring, io_threads=cfg.io_threads, expected_run=self._identity.expected_run,
            damaged_chunks=self._writer.damaged, failed=failed, emit=self._event, signer=self.signer,
        )

    # --- policy ------------------------------------------------------------

    def should_save(self, step: int, now: Optional[float] = None) -> bool:
        """True when `every_steps` or `every_seconds` says step `step` is due (never twice for one step)."""
        return self._policy.is_due(step, self._clock() if now is None else now)

    # --- saving ------------------------------------------------------------

    def save(self, tensors: dict[str, torch.Tensor], skeleton: Any, *, step: int, term: int,
             lineage: Optional[dict] = None) -> None:
        """Save a flattened state (see `elastictrain.statetree.flatten_state`); `lineage`: who produced the
        steps since the previous checkpoint (`elastictrain.checkpoint.provenance`), stored in its manifest.

        With async_save, returns once the tensors are copied aside; otherwise once committed.
        A save waits for the one in flight first.

        Raises:
            ValueError: bad names, dtypes, step or term (before anything is written).
            StaleTerm, CheckpointError, OSError: from a synchronous save.
        """
        if self._closed:
            raise RuntimeError("CheckpointManager is closed")
        manifest_name(step, term)  # a step or term its name cannot hold is refused here, not lost later
        lineage = check_lineage(dict(lineage or {}))  # so is a lineage no reader would accept
        layout = plan_layout(tensors, skeleton)  # every entry storable, the skeleton JSON, the header not too large
        self._saver.join()
        self._policy.started(step, self._clock())
        if not self.config.async_save:
            cpu = {n: t.detach().to("cpu").resolve_neg() for n, t in tensors.items()}
            self._save_now(cpu, layout, step, term, {}, from_snapshot=False, lineage=lineage)
            return
        snap = self._snapshotter.take(tensors)
        self._saver.start(
            lambda: self._save_now(snap.tensors, layout, step, term, snap.reuse, from_snapshot=True, lineage=lineage),
            name=f"et-ckpt-save-{step}",
        )

    @property
    def saving(self) -> bool:
        """Whether an async save is still in flight (its `save()` returned, its commit has not happened)."""
        return self._saver.busy

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its error.

        Only the last save started is reported here; every failed save is also a `save_failed` event.
        """
        self._saver.wait()

    def close(self) -> None:
        """Wait for the save in flight and stop background threads (an error stays in `events`)."""
        self._saver.join()
        self._closed = True

    def _save_now(self, tensors, layout: Layout, step: int, term: int, reuse, *, from_snapshot: bool,
                  lineage: Optional[dict] = None) -> None:
        """Open the run, write the checkpoint, then apply retention (a failure there is only an event)."""
        try:
            run_keys = self._open_run()
            self._identity.maybe_write_file(run_keys)
            chunk_files = self._writer.refresh()
            report, piece_ids = self._writer.write(
                tensors, layout, step=step, term=term, run_keys=run_keys, chunk_size=self._chunk_size,
                reuse=reuse, fence=self.fence, provenance=self.provenance, clock=self._clock, nonce=self._random,
                lineage=lineage, attestation=self.attestation,
            )
        except BaseException as exc:
            self._event("checkpoint_failed", step=step, term=term, reason=f"{type(exc).__name__}: {exc}")
            self._raise_hidden(exc)
            raise
        if from_snapshot:
            self._snapshotter.committed(piece_ids)
        self.reports.append(report)
        self._event("checkpoint", step=step, term=term, bytes_written=report.bytes_written, seconds=report.seconds)
        self._record_newest(step, term)
        try:  # with the listing taken before the save: what it wrote is referenced by its manifest, and
            # what another writer stored since is not in it, so retention leaves both alone
            self._apply_retention(run_keys.run, term, chunk_files, report.name)
        except Exception as exc:  # noqa: BLE001 - the save is committed; retention tries again next time
            self._event("retention_failed", reason=f"{type(exc).__name__}: {exc}")

    def _open_run(self) -> RunKeys:
        """This run's id and keys: reused from storage (a resubmitted job), else new."""
        return self._identity.open()

    def _apply_retention(self, run: str, term: int, chunk_files: dict[str, int], committed: str) -> None:
        self._retention.apply(run, term, chunk_files, committed)

    def _record_newest(self, step: int, term: int) -> None:
        """Record the step just committed outside the storage; a failure is only a warning (the save stands)."""
        if self.newest_step is None:
            return
        try:
            self.newest_step.put(step, term)
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed either way
            log.warning("could not record the newest committed step %d outside the storage: %s: %s",
                        step, type(exc).__name__, exc)

    def _recorded_newest(self) -> Optional[RecordedStep]:
        """The newest committed step recorded outside the storage, if any (one that does not verify: a warning)."""
        if self.newest_step is None:
            return None
        try:
            return self.newest_step.get()
        except Exception as exc:  # noqa: BLE001 - a record nobody can trust decides nothing
            log.warning("the newest committed step recorded outside %s is not used: %s: %s",
                        self.config.uri or "the storage", type(exc).__name__, exc)
            return None

    def recorded_step(self) -> Optional[int]:
        """The newest committed step recorded outside the storage (None: no record, or none that verifies):
        where the lineage of the next checkpoint starts when this process saved none yet."""
        recorded = self._recorded_newest()
        return None if recorded is None else recorded.step

    def _maybe_report_rollback(self, recorded: Optional[RecordedStep], found: Optional[int]) -> None:
        """A `checkpoint_rollback` event and a warning when the newest that verifies is older than the record."""
        if recorded is None or (found is not None and found >= recorded.step):
            return
        log.warning(
            "checkpoint rollback under %s: the newest committed step recorded outside the storage is %d, but "
            "%s; checkpoints were deleted or rolled back by whoever can write to the storage",
            self.config.uri or "the storage", recorded.step,
            "no checkpoint verifies" if found is None else f"the newest checkpoint that verifies is step {found}: "
            "resuming from it",
        )
        self._event("checkpoint_rollback", recorded_step=recorded.step, recorded_term=recorded.term,
                    found_step=found)

    # --- reading -------------------------------------------------------------
    # Each read first waits for this manager's own save in flight: it could otherwise commit meanwhile,
    # and its retention retire what is being read.

    def load_manifest(self, name: str, into: Optional[dict[str, torch.Tensor]] = None) -> Loaded:
        """Read and verify the checkpoint of one manifest name (as `list()` gives it).

        `into`: restore into these tensors in place where they match (see `latest`).

        Raises:
            CheckpointError: what is wrong with it.
        """
        self._saver.join()
        with self._secrets_hidden():
            return self._restorer.load_manifest(name, into)

    def latest(self, into: Optional[dict[str, torch.Tensor]] = None) -> Optional[Loaded]:
        """The newest checkpoint that verifies; None if there is none at all.

        Damaged newer checkpoints are skipped (listed in `.skipped` and `events`). One of a format
        version this release does not read is not: it raises UnsupportedFormat instead of rolling back.

        `into`: flattened tensors to restore into in place, by name (`flatten_state` of the live state):
        each contiguous CPU tensor of the stored dtype and shape receives its bytes directly, which
        saves allocating and copying the state once more. Those tensors are overwritten even by a
        checkpoint that then fails to verify (an older one, if any verifies, is restored over it);
        after an error, do not use them.

        With a `newest_store`, a newest checkpoint older than the step recorded there (or none at all) is
        reported as a `checkpoint_rollback` event and a warning naming both steps; it is still restored.

        Raises:
            CheckpointError: checkpoints exist but none verifies (wrong key, all damaged).
        """
        self._saver.join()
        recorded = self._recorded_newest()
        try:
            with self._secrets_hidden():
                loaded = self._hide_in_skipped(self._restorer.latest(into))
        except CheckpointError:
            self._maybe_report_rollback(recorded, None)
            raise
        self._maybe_report_rollback(recorded, None if loaded is None else loaded.step)
        return loaded

    def load(self, step: int, into: Optional[dict[str, torch.Tensor]] = None) -> Loaded:
        """The checkpoint of `step` (its newest term that verifies); `into` as for `latest`.

        Raises:
            CheckpointNotFound: no checkpoint of that step.
        """
        self._saver.join()
        with self._secrets_hidden():
            return self._hide_in_skipped(self._restorer.load_step(step, into))

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest first, from the manifests alone (no key needed, nothing verified but format)."""
        with self._secrets_hidden():
            infos = describe_checkpoints(self.storage)
        if not self._secrets:
            return infos
        return [dataclasses.replace(i, error=scrub(i.error, self._secrets)) if i.error else i for i in infos]

    # --- credentials -----------------------------------------------------------
    # A storage backend may echo an option in an error (a URL with a token, a header): errors and
    # events of the manager show the storage's credential values as REDACTED.

    def _raise_hidden(self, exc: BaseException) -> None:
        """Raise a copy of `exc` without the storage's credentials if its message shows one."""
        hidden = scrub_error(exc, self._secrets) if isinstance(exc, Exception) else None
        if hidden is not None:
            raise hidden from None

    def _hide_in_skipped(self, loaded: Optional[Loaded]) -> Optional[Loaded]:
        """`loaded` with the reasons of the checkpoints skipped before it free of the storage's credentials."""
        if loaded is not None and self._secrets:
            loaded.skipped = [(name, scrub(reason, self._secrets)) for name, reason in loaded.skipped]
        return loaded

    @contextlib.contextmanager
    def _secrets_hidden(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._raise_hidden(exc)
            raise

    def check_manifests(self) -> list[Checked]:
        """Every manifest, oldest first, checked as retention checks it: signature and identity, no chunk read.

        Those that do not verify are what retention leaves in place (planted, damaged, another key's).
        """
        self._saver.join()
        return self._verifier.check_all(self.storage, manifest_names(self.storage), self.config.io_threads)

    # --- events --------------------------------------------------------------

    def _event(self, kind: str, **facts: Any) -> None:
        """Emit an event of the run's vocabulary (`elastictrain.events`) to `events` and the listener."""
        if self._secrets:
            facts = {k: scrub(v, self._secrets) if isinstance(v, str) else v for k, v in facts.items()}
        record = event(kind, time=self._clock(), **facts)
        # "event": the field's old name and values, kept for readers of `events` and listeners until removed
        record["event"] = _OLD_NAMES.get(kind, kind)
        self.events.append(record)
        if self.listener is not None:
            try:
                self.listener(dict(record))
            except Exception:  # noqa: BLE001 - a listener's trouble must not fail a save
                log.exception("checkpoint event listener failed")
        level = logging.WARNING if kind.endswith(("failed", "skipped")) else logging.INFO
        log.log(level, "checkpoint %s %s", kind, facts)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _newest_step(
    store: Optional[KVStore], config: CheckpointConfig, storage: Optional[Storage], keyring: Optional[Keyring],
    signer: Optional[crypto.Signer], run_secret: Optional["RunSecret"],
) -> Optional[KVNewestStep]:
    """The record of the newest committed step on `store`, authenticated by a key derived from the run's
    signing key, else its local keys (each rotation's, so older records verify), else the run secret."""
    if store is None:
        return None
    mac_keys = []
    signer = signer or (keyring.signer if keyring is not None else None)
    if signer is not None:
        mac_keys.append(signer.subkey("newest-step"))
    for source in [keyring.current, *keyring.old] if keyring is not None else []:
        seed = source.signing_seed()
        if seed is not None:
            mac_keys.append(crypto.derive(seed, "newest-step"))
    if not mac_keys and run_secret is not None:
        mac_keys.append(run_secret.subkey("checkpoint/newest-step"))
    if not mac_keys:
        log.warning("no key authenticates the newest committed step: it is not recorded outside the storage")
        return None
    return KVNewestStep(store, config.uri or (storage.uri if storage is not None else ""), mac_keys)


def _keyring(
    config: CheckpointConfig, environ: Optional[dict], random_bytes: Callable[[int], bytes]
) -> Optional[Keyring]:
    """The configured keys; a warning when manifests would be signed with a key derived from the data key."""
    enc = config.encryption
    if enc is None:
        return None
    keyring = keyring_from_specs(enc.key, enc.old_keys, enc.signing_key, environ, random_bytes)
    if keyring.signer is None and keyring.current.signing_seed() is None:
        log.warning(
            "checkpoint manifests under %s are signed with a key derived from the run's data key: with a "
            "KMS key, whoever may call kms:Encrypt (not Decrypt) and write to the storage can forge a "
            "checkpoint that verifies; set EncryptionConfig.signing_key to rule that out",
            config.uri or "this storage",
        )
    return keyring
