"""The run's identity and keys: its id (run.json) and data key, reused from storage or made by the first save.

A run's id, once known, is not read from storage again: run.json is not signed,
so someone who can write to the storage could otherwise swap in another run
under the same key in mid-run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.catalog import newest_bodies
from elastictrain.checkpoint.keys import Keyring
from elastictrain.checkpoint.manifest import RUN_FILE, Body, decode_run, encode_run, wrap_context
from elastictrain.checkpoint.storage import Storage
from elastictrain.checkpoint.writer import RunKeys
from elastictrain.errors import CheckpointCorrupt, CheckpointError, WrongKey


@dataclass(frozen=True)
class RunScan:
    """What the stored manifests say about a run: its id, its data key if a configured key opens it."""

    run: Optional[str]
    data_key: Optional[bytes] = field(repr=False)  # plaintext: never in a repr or a traceback
    encrypted: bool  # the run has encrypted checkpoints
    foreign: frozenset[str]  # key ids of the run's checkpoints that no configured key has


def scan_run(bodies: Iterable[Body], run: Optional[str], keyring: Optional[Keyring]) -> RunScan:
    """Walk manifest bodies (newest first) for `run` (else the newest one's run) and its data key.

    Stops at the first data key a configured key unwraps (or, without a keyring, at the first
    encrypted checkpoint of the run): `bodies` may be a lazy listing.
    """
    data_key = None
    encrypted = False
    foreign: set[str] = set()
    for body in bodies:
        run = run or body.run
        if body.run != run or not body.encrypted:
            continue
        encrypted = True
        if keyring is None:
            break
        try:
            source = keyring.find(body.key_id)
        except WrongKey:
            foreign.add(body.key_id)
            continue
        try:
            data_key = source.unwrap(body.wrapped_key, body.wrap_context())
            break
        except CheckpointError:  # a key it has that does not open it: its wrapped key is damaged
            continue
    return RunScan(run, data_key, encrypted, frozenset(foreign))


class RunIdentity:
    """This run's id and keys under one storage root, fixed once opened.

    Args:
        storage: the run's storage.
        keyring: the configured keys; None for unencrypted checkpoints.
        random_bytes: the source of new run ids and data keys.
        signer: a plaintext run's manifest signer (`CheckpointConfig.signing_key`), if any.
    """

    def __init__(
        self, storage: Storage, keyring: Optional[Keyring], random_bytes: Callable[[int], bytes],
        signer: Optional[crypto.Signer] = None,
    ):
        self.storage = storage
        self.keyring = keyring
        self.signer = signer
        self._random = random_bytes
        self._lock = threading.Lock()
        self.keys: Optional[RunKeys] = None
        self._file_written = False
        self._seen: Optional[str] = None  # the run id run.json gave the first restore

    def open(self) -> RunKeys:
        """This run's id and keys: reused from storage (a resubmitted job), else new.

        Raises:
            WrongKey: the storage holds the run's checkpoints under keys none of the configured ones opens,
                or encrypted ones while no key is configured.
            CheckpointCorrupt, UnsupportedFormat: run.json is damaged, or from a newer release.
        """
        with self._lock:
            if self.keys is not None:
                return self.keys
            run = self.read_file()
            self._file_written = run is not None
            run = self._seen or run  # what an earlier restore read (see expected_run)
            self.keys = self._make_keys(scan_run(newest_bodies(self.storage), run, self.keyring))
            return self.keys

    def _make_keys(self, scan: RunScan) -> RunKeys:
        run = scan.run or self._random(16).hex()
        if self.keyring is None:
            if scan.encrypted:
                raise WrongKey(
                    f"{self.storage.uri} holds an encrypted run: refusing to write plaintext checkpoints "
                    "next to it; set CheckpointConfig.encryption to its key"
                )
            return RunKeys(run, None, signer=self.signer)
        if scan.data_key is None and scan.foreign:
            # a new data key here would start checkpoints nobody with the run's key can read, and
            # retention would count the run's real ones as this writer's and delete them
            raise WrongKey(
                f"{self.storage.uri} holds checkpoints of this run under key id "
                f"{', '.join(sorted(scan.foreign))}, which is none of the configured keys: refusing to write "
                "beside them; pass that key, or list it in EncryptionConfig.old_keys after a rotation"
            )
        data_key = scan.data_key or self._random(crypto.KEY_BYTES)
        current = self.keyring.current
        wrapped = current.wrap(data_key, wrap_context(run))
        key_id = getattr(current, "wrapped_key_id", None) or current.key_id  # KMS: the key it really used
        return RunKeys(run, crypto.DataKeys(data_key), key_id, wrapped, self.keyring.signer_for(current, data_key))

    def maybe_write_file(self, run_keys: RunKeys) -> None:
        """Write run.json naming the run, unless it is known to exist (left as is if another writer made it)."""
        if self._file_written:
            return
        try:
            self.storage.get(RUN_FILE)
        except FileNotFoundError:
            self.storage.put(RUN_FILE, [encode_run(run_keys.run)])
        self._file_written = True

    def expected_run(self) -> Optional[str]:
        """The run whose checkpoints are read: its own once it has one, else what run.json names."""
        if self.keys is not None:
            return self.keys.run
        if self._seen is None:
            self._seen = self.read_file()
        return self._seen

    def read_file(self) -> Optional[str]:
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
