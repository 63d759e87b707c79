"""CheckpointManager: the runtime's one handle on checkpoints (policy, async saves, restore, retention).

>>> mgr = CheckpointManager(CheckpointConfig(uri="memory://doc-run", async_save=False))
>>> mgr.save({"w": torch.ones(2)}, {"__tensor__": "w"}, step=1, term=0)
>>> mgr.latest().step
1
>>> mgr.close()
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.keys import Keyring, keyring_from_specs
from elastictrain.checkpoint.manifest import (
    CHUNK_DIR, MANIFEST_DIR, RUN_FILE, Body, decode_as_current, decode_manifest, decode_run, encode_run,
    manifest_name, parse_manifest_name, wrap_context,
)
from elastictrain.checkpoint.reader import Loaded, open_decoded, open_manifest, read_tensors
from elastictrain.checkpoint.retention import plan_retention
from elastictrain.checkpoint.snapshot import Snapshotter
from elastictrain.checkpoint.storage import FsspecStorage, Storage
from elastictrain.checkpoint.writer import ChunkWriter, RunKeys, SaveReport, plan_layout
from elastictrain.config import CheckpointConfig
from elastictrain.errors import CheckpointCorrupt, CheckpointError, CheckpointNotFound, UnsupportedFormat, WrongKey

log = logging.getLogger("elastictrain.checkpoint")

# A temporary file of a local put this much older than now belongs to a writer that died: no chunk
# or manifest write of a live one takes an hour.
STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class CheckpointInfo:
    """One stored checkpoint as `list()` and `elastictrain ckpt ls` show it (no key needed)."""

    name: str
    step: int
    term: int
    time_ns: int
    size: int  # bytes of the safetensors content
    stored_bytes: int  # bytes of its chunks in storage (shared chunks counted in each)
    encrypted: bool
    key_id: Optional[str]
    run: Optional[str]
    error: Optional[str] = None  # set when the manifest does not even parse

    @property
    def time(self) -> float:
        """When the checkpoint was written (seconds since the epoch)."""
        return self.time_ns / 1e9


class CheckpointManager:
    """Saves and restores one run's checkpoints under `config.uri`.

    Args:
        config: where, how often, how many to keep, encryption.
        fence: called with a save's term right before its manifest is written; False abandons the save.
        provenance: labels stored in each manifest (node, host, provider, region).
        listener: called with each event as it happens (on the saving thread): the runtime reports a
            commit the moment its manifest is written, not when the training thread next looks.
        storage, environ, clock, random_bytes: for tests (a storage double, key variables, time, and the
            source of run ids, data keys and nonces).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        fence: Optional[Callable[[int], bool]] = None,
        provenance: Optional[dict] = None,
        listener: Optional[Callable[[dict], None]] = None,
        storage: Optional[Storage] = None,
        environ: Optional[dict] = None,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ):
        if config.uri is None and storage is None:
            raise ValueError("CheckpointConfig.uri is unset: give a URI such as file:///tmp/run1 or s3://bucket/run1")
        self.config = config
        self.storage: Storage = storage or FsspecStorage(config.uri, config.storage_options, fsync=config.fsync)
        enc = config.encryption
        self.keyring: Optional[Keyring] = (
            keyring_from_specs(enc.key, enc.old_keys, enc.signing_key, environ, random_bytes) if enc else None
        )
        if self.keyring is not None and self.keyring.signer is None and self.keyring.current.signing_seed() is None:
            log.warning(
                "checkpoint manifests under %s are signed with a key derived from the run's data key: with a "
                "KMS key, whoever may call kms:Encrypt (not Decrypt) and write to the storage can forge a "
                "checkpoint that verifies; set EncryptionConfig.signing_key to rule that out",
                config.uri or "this storage",
            )
        self.fence = fence
        self.listener = listener
        self.provenance = {"host": socket.gethostname(), **{str(k): str(v) for k, v in (provenance or {}).items()}}
        self.events: list[dict[str, Any]] = []
        self.reports: list[SaveReport] = []
        self._clock, self._random = clock, random_bytes
        self._chunk_size = config.chunk_size_mb * 1024 * 1024
        self._snapshotter = Snapshotter(self._chunk_size)
        self._writer = ChunkWriter(self.storage, config.io_threads)
        self._run_lock = threading.Lock()
        self._run_keys: Optional[RunKeys] = None
        self._run_file_written = False
        self._run_seen: Optional[str] = None  # the run id run.json gave the first restore
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._last_step: Optional[int] = None
        self._swept_at: Optional[float] = None  # when temporaries were last swept
        self._failed: set[str] = set()  # manifests a restore found damaged or under a key it lacks: not kept
        self._last_time = clock()

    # --- policy ------------------------------------------------------------

    def should_save(self, step: int, now: Optional[float] = None) -> bool:
        """True when `every_steps` or `every_seconds` says step `step` is due (never twice for one step)."""
        if self._last_step is not None and step <= self._last_step:
            return False
        cfg = self.config
        if cfg.every_steps is not None and step % cfg.every_steps == 0:
            return True
        now = self._clock() if now is None else now
        return cfg.every_seconds is not None and now - self._last_time >= cfg.every_seconds

    # --- saving ------------------------------------------------------------

    def save(self, tensors: dict[str, torch.Tensor], skeleton: Any, *, step: int, term: int) -> None:
        """Save a flattened state (see `elastictrain.statetree.flatten_state`).

        With async_save, returns once the tensors are copied aside; otherwise once committed.
        A save waits for the one in flight first.

        Raises:
            ValueError: bad names, dtypes, step or term (before anything is written).
            StaleTerm, CheckpointError, OSError: from a synchronous save.
        """
        if self._closed:
            raise RuntimeError("CheckpointManager is closed")
        manifest_name(step, term)  # a step or term its name cannot hold is refused here, not lost later
        layout = plan_layout(tensors, skeleton)  # every entry storable, the skeleton JSON, the header not too large
        self._join()
        self._last_step, self._last_time = step, self._clock()
        if not self.config.async_save:
            cpu = {n: t.detach().to("cpu").resolve_neg() for n, t in tensors.items()}
            self._save_now(cpu, layout, step, term, {}, from_snapshot=False)
            return
        snap = self._snapshotter.take(tensors)
        self._error = None  # an earlier background save's failure stays in `events`; wait() reports this one's
        self._thread = threading.Thread(
            target=self._save_background, args=(snap.tensors, layout, step, term, snap.reuse),
            name=f"et-ckpt-save-{step}", daemon=True,
        )
        self._thread.start()

    @property
    def saving(self) -> bool:
        """Whether an async save is still in flight (its `save()` returned, its commit has not happened)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its error.

        Only the last save started is reported here; every failed save is also a `save_failed` event.
        """
        self._join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the save in flight and stop background threads (an error stays in `events`)."""
        self._join()
        self._closed = True

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _save_background(self, tensors, layout, step, term, reuse) -> None:
        try:
            self._save_now(tensors, layout, step, term, reuse, from_snapshot=True)
        except BaseException as exc:  # kept for wait(); a background thread has nobody else to tell
            self._error = exc

    def _save_now(self, tensors, layout, step, term, reuse, *, from_snapshot: bool) -> None:
        try:
            run_keys = self._open_run()
            if not self._run_file_written:
                try:
                    self.storage.get(RUN_FILE)
                except FileNotFoundError:
                    self.storage.put(RUN_FILE, [encode_run(run_keys.run)])
                self._run_file_written = True
            chunk_files = self._writer.refresh()
            report, piece_ids = self._writer.write(
                tensors, layout, step=step, term=term, run_keys=run_keys, chunk_size=self._chunk_size,
                reuse=reuse, fence=self.fence, provenance=self.provenance, clock=self._clock, nonce=self._random,
            )
        except BaseException as exc:
            self._event("save_failed", step=step, term=term, reason=f"{type(exc).__name__}: {exc}")
            raise
        if from_snapshot:
            self._snapshotter.committed(piece_ids)
        self.reports.append(report)
        self._event("saved", step=step, term=term, bytes_written=report.bytes_written, seconds=report.seconds)
        try:  # with the listing taken before the save: what it wrote is referenced by its manifest, and
            # what another writer stored since is not in it, so retention leaves both alone
            self._apply_retention(run_keys.run, term, chunk_files)
        except Exception as exc:  # noqa: BLE001 - the save is committed; retention tries again next time
            self._event("retention_failed", reason=f"{type(exc).__name__}: {exc}")

    def _apply_retention(self, run: str, term: int, chunk_files: dict[str, int]) -> None:
        names = self._manifest_names()
        # every manifest read again, each save: one damaged since the last save must not count as kept;
        # read at once, so an object store answers them in about one round trip
        threads = max(1, min(len(names), self.config.io_threads))
        with ThreadPoolExecutor(threads, thread_name_prefix="et-ckpt-retention") as pool:
            bodies = dict(zip(names, pool.map(self._body_or_none, names)))
        self._failed &= set(names)
        plan = plan_retention(bodies, chunk_files, self.config.keep_last, run, frozenset(self._failed))
        # A newer term's leader may be saving already, and reuse a chunk this plan, made without its
        # manifest, would delete: only the current term's writer deletes, checked right before each step.
        if (plan.manifests or plan.chunks) and not self._still_current(term):
            return
        # manifests first, each delete checked: a crash or a failed delete here leaves only garbage chunks;
        # those may go in batches whose failures nobody reports (they are listed, and tried, next time)
        self.storage.delete(plan.manifests)
        if plan.chunks and not self._still_current(term):
            return
        getattr(self.storage, "discard", self.storage.delete)(plan.chunks)
        for name in plan.chunks:
            self._writer.known.pop(name.rsplit("/", 1)[-1], None)
        if plan.manifests:
            self._event("retention", deleted=list(plan.manifests), chunks_deleted=len(plan.chunks))
        sweep = getattr(self.storage, "remove_stale_temporaries", None)
        now = self._clock()
        # left by a writer killed mid-put: no listing shows them, nothing else removes them. They only
        # become stale after STALE_TEMP_S, so walking the folders more often than that finds nothing new.
        if sweep is not None and (self._swept_at is None or now - self._swept_at >= STALE_TEMP_S):
            self._swept_at = now
            removed = sweep([CHUNK_DIR, MANIFEST_DIR], STALE_TEMP_S)
            if removed:
                self._event("retention", temporaries_deleted=removed)

    def _still_current(self, term: int) -> bool:
        """Whether the fence still lets `term` write; an event when it does not."""
        if self.fence is None or self.fence(term):
            return True
        self._event("retention_skipped", term=term, reason="a newer term leads: its writer deletes what is old")
        return False

    # --- the run's identity and data key -------------------------------------

    def _open_run(self) -> RunKeys:
        """This run's id and keys: reused from storage (a resubmitted job), else new."""
        with self._run_lock:
            if self._run_keys is not None:
                return self._run_keys
            run = self._read_run_file()
            self._run_file_written = run is not None
            run = self._run_seen or run  # what an earlier restore read (see _expected_run)
            data_key = None
            encrypted = False  # the run has encrypted checkpoints
            foreign: set[str] = set()  # key ids of this run's checkpoints that no configured key has
            for body in self._bodies():
                run = run or body.run
                if body.run != run or not body.encrypted:
                    continue
                encrypted = True
                if self.keyring is None:
                    break
                try:
                    source = self.keyring.find(body.key_id)
                except WrongKey:
                    foreign.add(body.key_id)
                    continue
                try:
                    data_key = source.unwrap(body.wrapped_key, body.wrap_context())
                    break
                except CheckpointError:  # a key it has that does not open it: its wrapped key is damaged
                    continue
            run = run or self._random(16).hex()
            if self.keyring is None:
                if encrypted:
                    raise WrongKey(
                        f"{self.storage.uri} holds an encrypted run: refusing to write plaintext checkpoints "
                        "next to it; set CheckpointConfig.encryption to its key"
                    )
                self._run_keys = RunKeys(run, None)
                return self._run_keys
            if data_key is None and foreign:
                # a new data key here would start checkpoints nobody with the run's key can read, and
                # retention would count the run's real ones as this writer's and delete them
                raise WrongKey(
                    f"{self.storage.uri} holds checkpoints of this run under key id "
                    f"{', '.join(sorted(foreign))}, which is none of the configured keys: refusing to write "
                    "beside them; pass that key, or list it in EncryptionConfig.old_keys after a rotation"
                )
            data_key = data_key or self._random(crypto.KEY_BYTES)
            current = self.keyring.current
            wrapped = current.wrap(data_key, wrap_context(run))
            key_id = getattr(current, "wrapped_key_id", None) or current.key_id  # KMS: the key it really used
            self._run_keys = RunKeys(
                run, crypto.DataKeys(data_key), key_id, wrapped, self.keyring.signer_for(current, data_key),
            )
            return self._run_keys

    def _expected_run(self) -> Optional[str]:
        """The run whose checkpoints this manager reads: its own once it has one, else what run.json names.

        A run's id, once known (read once, or made by the first save), is not read from storage again:
        run.json is not signed, so someone who can write to the storage could otherwise swap in another
        run under the same key in mid-run.
        """
        if self._run_keys is not None:
            return self._run_keys.run
        if self._run_seen is None:
            self._run_seen = self._read_run_file()
        return self._run_seen

    def _read_run_file(self) -> Optional[str]:
        """The run id run.json names; None when there is no run.json.

        Raises:
            CheckpointCorrupt, UnsupportedFormat: run.json is damaged, or from a newer release.
        """
        try:
            raw = self.storage.get(RUN_FILE)
        except FileNotFoundError:
            return None
        try:
            return decode_run(raw)
        except CheckpointCorrupt as exc:
            raise CheckpointCorrupt(
                f"{exc} under {self.storage.uri}; the checkpoints themselves are untouched: delete {RUN_FILE} "
                "to go on (the next save writes it again, naming the newest checkpoint's run)"
            ) from None

    # --- reading -------------------------------------------------------------

    def _manifest_names(self) -> list[str]:
        """Manifest names, oldest first by (step, term)."""
        named = [(parse_manifest_name(n), n) for n in self.storage.list(MANIFEST_DIR)]
        return [n for key, n in sorted(k for k in named if k[0] is not None)]

    def _body_or_none(self, name: str) -> Optional[Body]:
        """The decoded body of a manifest; None if it does not decode or is gone (nothing verified)."""
        try:
            return decode_manifest(self.storage.get(name)).body
        except (CheckpointError, FileNotFoundError):
            return None

    def _load(
        self, name: str, run: Optional[str], into: Optional[dict[str, torch.Tensor]], encrypted_runs: dict[str, bool]
    ) -> Loaded:
        """Open and read one manifest; `encrypted_runs` caches `_encrypted_run` over one restore."""
        opened = open_manifest(self.storage, name, self.keyring, run)
        body = opened.body
        if self.keyring is None and not body.encrypted:
            if body.run not in encrypted_runs:
                encrypted_runs[body.run] = self._encrypted_run(body.run)
            if encrypted_runs[body.run]:
                # without a key nothing here can be authenticated: a plaintext manifest among encrypted ones
                # is what someone who can write to the storage would plant
                raise CheckpointCorrupt(
                    f"manifest {name} is unencrypted but its run's other checkpoints are encrypted: refused "
                    "(pass the run's key to read it)"
                )
        return read_tensors(self.storage, opened, self.config.io_threads, into)

    def _encrypted_run(self, run: str) -> bool:
        """Whether any readable manifest of `run` is encrypted."""
        return any(body.run == run and body.encrypted for body in self._bodies())

    def _bodies(self) -> Iterator[Body]:
        """The body of each manifest that decodes, newest first (damaged or vanished ones are passed over)."""
        for name in reversed(self._manifest_names()):
            body = self._body_or_none(name)
            if body is not None:
                yield body

    def load_manifest(self, name: str, into: Optional[dict[str, torch.Tensor]] = None) -> Loaded:
        """Read and verify the checkpoint of one manifest name (as `list()` gives it).

        `into`: restore into these tensors in place where they match (see `latest`).

        Raises:
            CheckpointError: what is wrong with it.
        """
        self._join()
        return self._load(name, self._expected_run(), into, {})

    def _first_that_verifies(
        self, names: list[str], what: str, into: Optional[dict[str, torch.Tensor]],
        skipped: Optional[list[tuple[str, str]]] = None,
    ) -> Loaded:
        """The first of `names` that verifies; each one before it is appended to `skipped` with the reason."""
        run = self._expected_run()
        skipped = [] if skipped is None else skipped
        errors: list[CheckpointError] = []
        encrypted_runs: dict[str, bool] = {}
        for name in names:
            try:
                loaded = self._load(name, run, into, encrypted_runs)
            except CheckpointError as exc:
                if isinstance(exc, UnsupportedFormat):
                    exc = self._version_damage(name, run, exc)  # or raises: a newer release wrote it
                if getattr(exc, "chunk_id", None):  # rewrite it when a save needs it: content addressing
                    self._writer.damaged.add(exc.chunk_id)  # repairs every checkpoint that shares it
                if isinstance(exc, (CheckpointCorrupt, WrongKey)):  # unreadable here: not counted as kept
                    self._failed.add(name)
                reason = f"{type(exc).__name__}: {exc}"
                skipped.append((name, reason))
                errors.append(exc)
                self._event("checkpoint_skipped", manifest=name, reason=reason)
                continue
            loaded.skipped = skipped
            self._failed.discard(name)
            return loaded
        first = errors[0]
        more = f" (and {len(errors) - 1} older ones failed too)" if len(errors) > 1 else ""
        raise type(first)(f"no {what} verifies under {self.storage.uri}: {first}{more}") from first

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
                open_decoded(name, decoded, self.keyring, run)
                return CheckpointCorrupt(f"manifest {name}: its format or version field is damaged ({exc})")
        except (CheckpointError, FileNotFoundError):
            pass
        raise UnsupportedFormat(
            f"{exc} ({name} under {self.storage.uri}; the checkpoints before it are not restored in its "
            f"place, which would roll the run back: upgrade elastictrain, or remove {name} to resume from "
            "the one before it)"
        ) from None

    def latest(self, into: Optional[dict[str, torch.Tensor]] = None) -> Optional[Loaded]:
        """The newest checkpoint that verifies; None if there is none at all.

        Damaged newer checkpoints are skipped (listed in `.skipped` and `events`). One of a format
        version this release does not read is not: it raises UnsupportedFormat instead of rolling back.

        `into`: flattened tensors to restore into in place, by name (`flatten_state` of the live state):
        each contiguous CPU tensor of the stored dtype and shape receives its bytes directly, which
        saves allocating and copying the state once more. Those tensors are overwritten even by a
        checkpoint that then fails to verify (an older one, if any verifies, is restored over it);
        after an error, do not use them.

        Raises:
            CheckpointError: checkpoints exist but none verifies (wrong key, all damaged).
        """
        self._join()  # this manager's own save in flight could otherwise commit, and retire what is read
        names = list(reversed(self._manifest_names()))
        if not names:
            return None
        skipped: list[tuple[str, str]] = []  # both passes' skipped checkpoints, reported together
        try:
            return self._first_that_verifies(names, "checkpoint", into, skipped)
        except CheckpointError:
            # another writer may have committed newer checkpoints (and retired the ones listed) meanwhile
            newer = [n for n in reversed(self._manifest_names()) if n not in names]
            if not newer:
                raise
            return self._first_that_verifies(newer, "checkpoint", into, skipped)

    def load(self, step: int, into: Optional[dict[str, torch.Tensor]] = None) -> Loaded:
        """The checkpoint of `step` (its newest term that verifies); `into` as for `latest`.

        Raises:
            CheckpointNotFound: no checkpoint of that step.
        """
        self._join()
        all_names = self._manifest_names()
        names = [n for n in reversed(all_names) if parse_manifest_name(n)[0] == step]
        if not names:
            steps = sorted({parse_manifest_name(n)[0] for n in all_names})
            raise CheckpointNotFound(f"no checkpoint of step {step} under {self.storage.uri}; steps: {steps}")
        return self._first_that_verifies(names, f"checkpoint of step {step}", into)

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest first, from the manifests alone (no key needed, nothing verified but format)."""
        out = []
        for name in self._manifest_names():
            step, term = parse_manifest_name(name)
            try:
                body = decode_manifest(self.storage.get(name)).body
            except (CheckpointError, FileNotFoundError) as exc:
                out.append(CheckpointInfo(name, step, term, 0, 0, 0, False, None, None, f"{type(exc).__name__}: {exc}"))
                continue
            out.append(CheckpointInfo(
                name, body.step, body.term, body.time_ns, body.content_bytes, sum(s for _, s in body.chunks),
                body.encrypted, body.key_id, body.run,
            ))
        return out

    def _event(self, kind: str, **facts: Any) -> None:
        event = {"event": kind, "time": self._clock(), **facts}
        self.events.append(event)
        if self.listener is not None:
            try:
                self.listener(dict(event))
            except Exception:  # noqa: BLE001 - a listener's trouble must not fail a save
                log.exception("checkpoint event listener failed")
        level = logging.WARNING if kind.endswith(("failed", "skipped")) else logging.INFO
        log.log(level, "checkpoint %s %s", kind, facts)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
