"""Which stored manifests are the run's own: signature and identity checked, no chunk read.

Retention and `elastictrain ckpt verify` ask this before they count, keep or
compare a checkpoint: a manifest that does not verify under the run's signer
(planted by someone who can write to the storage, signed by another key,
renamed, edited) is never counted, compared or deleted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from elastictrain.checkpoint import crypto
from elastictrain.checkpoint.keys import Keyring
from elastictrain.checkpoint.manifest import Body, decode_manifest
from elastictrain.checkpoint.reader import open_decoded
from elastictrain.checkpoint.storage import Storage
from elastictrain.errors import CheckpointError


@dataclass(frozen=True)
class Checked:
    """One manifest as checked: its body when it decodes, and None as `problem` when it verifies."""

    name: str
    body: Optional[Body]
    problem: Optional[str]

    @property
    def verified(self) -> bool:
        return self.problem is None


class ManifestVerifier:
    """Checks manifests of one run the way a restore does, short of reading their chunks.

    Args:
        keyring: the configured keys (encrypted runs); None for plaintext.
        signer: a plaintext run's signer (`CheckpointConfig.signing_key`); None: plaintext manifests carry a
            SHA-256 digest that anyone can recompute, so only their form, name and run id are checked.
        expected_run: the run whose manifests are the run's own (None: whichever run run.json names).
    """

    def __init__(
        self, keyring: Optional[Keyring], signer: Optional[crypto.Signer],
        expected_run: Callable[[], Optional[str]],
    ):
        self.keyring, self.signer = keyring, signer
        self.expected_run = expected_run
        self._data_keys: dict[tuple[str, bytes], bytes] = {}  # unwrapped once per run, not per manifest

    def check(self, storage: Storage, name: str, run: Optional[str] = None) -> Checked:
        """Whether the manifest `name` verifies as one of `run`'s (default: the expected run)."""
        run = run if run is not None else self.expected_run()
        body = None
        try:
            decoded = decode_manifest(storage.get(name))
            body = decoded.body
            if run is None:  # no run named anywhere: nothing can be the run's own
                return Checked(name, body, "no run id to check it against (run.json is missing)")
            open_decoded(name, decoded, self.keyring, run, self.signer, self._data_keys)
        except FileNotFoundError:
            return Checked(name, None, "gone")
        except CheckpointError as exc:
            return Checked(name, body, f"{type(exc).__name__}: {exc}")
        return Checked(name, body, None)

    def check_all(self, storage: Storage, names: list[str], threads: int, run: Optional[str] = None) -> list[Checked]:
        """`check` of each name, read at once so an object store answers in about one round trip."""
        threads = max(1, min(len(names), threads))
        with ThreadPoolExecutor(threads, thread_name_prefix="et-ckpt-verify") as pool:
            return list(pool.map(lambda name: self.check(storage, name, run), names))
