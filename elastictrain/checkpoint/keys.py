"""Key specs ('env:VAR', 'file:PATH', 'kms:KEY_ID') resolved into key sources, and the keyring.

This is the one place that reads environment variables for keys. A key never
leaves this module except to wrap or unwrap a data key: storage and logs only
ever see a key id (a fingerprint, or the KMS key id) and the wrapped data key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Protocol, Sequence

from elastictrain.checkpoint import crypto
from elastictrain.errors import KeyServiceError, KeySpecError, WrongKey


class KeySource(Protocol):
    """Something that wraps and unwraps a run's data key."""

    key_id: str

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...

    def signing_seed(self) -> Optional[bytes]:
        """Seed of the manifest signing key, or None to derive it from the data key."""
        ...


def generate_key() -> str:
    """A new random 32-byte key, base64 (what `elastictrain ckpt keygen` prints)."""
    return base64.b64encode(secrets.token_bytes(crypto.KEY_BYTES)).decode()


def decode_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeySpecError(f"{where} is not base64: generate one with `elastictrain ckpt keygen`") from None
    if len(raw) != crypto.KEY_BYTES:
        hint = " (it looks like hex: convert it with `xxd -r -p | base64`)" if _is_hex_key(text) else ""
        raise KeySpecError(f"{where} decodes to {len(raw)} bytes; a key is {crypto.KEY_BYTES} bytes (base64){hint}")
    return raw


class LocalKey:
    """A 32-byte key held in memory (from an environment variable or a file)."""

    def __init__(self, secret: bytes, nonce_source: Callable[[int], bytes] = secrets.token_bytes):
        self._secret = secret
        self._nonce = nonce_source
        self.key_id = "local:" + crypto.key_fingerprint(secret)

    def __repr__(self) -> str:  # never show the secret
        return f"LocalKey({self.key_id})"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        return crypto.wrap_key(self._secret, data_key, context + self.key_id.encode(), self._nonce(12))

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return crypto.unwrap_key(self._secret, wrapped, context + self.key_id.encode())

    def signing_seed(self) -> Optional[bytes]:
        return crypto.derive(self._secret, "manifest-signing")


class KmsKey:
    """An AWS KMS key: the data key is wrapped by KMS Encrypt and opened by KMS Decrypt.

    The endpoint, region and credentials come from the usual AWS settings (boto3).
    Manifests record the ARN of the key that KMS actually used (`wrapped_key_id`), not the
    spec: an alias moved to a new key then still names the old one, which `old_keys` can
    hold under any of its names (id, ARN or an alias of its own).
    """

    def __init__(self, kms_key_id: str, client: object | None = None):
        self.kms_key_id = kms_key_id
        self.key_id = "kms:" + kms_key_id
        self.wrapped_key_id: Optional[str] = None  # "kms:<ARN>" once a wrap has told which key it used
        self._client = client
        self._arn: Optional[str] = None
        self._describe_refused: Optional[str] = None  # KMS's refusal to resolve the spec to an ARN, if any

    def matches(self, key_id: str) -> bool:
        """Whether a manifest's key id names this key: its spec, or the ARN it resolves to now. Where KMS
        does not let this principal resolve it (no kms:DescribeKey), any KMS ARN may: Decrypt decides."""
        if key_id in (self.key_id, self.wrapped_key_id):
            return True
        if not key_id.startswith("kms:arn:"):
            return False
        if self._describe_refused:
            return True
        if self._arn is None:
            try:
                self._arn = self._kms().describe_key(KeyId=self.kms_key_id)["KeyMetadata"]["Arn"]
            except Exception as exc:  # noqa: BLE001 - sorted by KMS's error code below
                code = _kms_code(exc)
                if code == "NotFoundException":  # the spec names no key at all
                    return False
                if code in _KMS_REFUSALS:
                    # not allowed to ask (no kms:DescribeKey): let Decrypt, which reads the key from the
                    # wrapped blob, answer whether this principal can open it
                    self._describe_refused = code
                    return True
                # throttled, unreachable: nothing is known, and a WrongKey here would restore an older step
                raise _service_error(exc, f"which key {self.kms_key_id!r} names") from None
        return key_id == "kms:" + self._arn

    def __repr__(self) -> str:
        return f"KmsKey({self.kms_key_id})"

    def _kms(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("kms")
        return self._client

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        try:
            reply = self._kms().encrypt(
                KeyId=self.kms_key_id, Plaintext=data_key, EncryptionContext={"elastictrain": context.hex()}
            )
        except Exception as exc:  # botocore's errors share no base we can import lazily
            raise KeySpecError(f"KMS key {self.kms_key_id!r} cannot encrypt: {_kms_reason(exc)}") from None
        if reply.get("KeyId"):
            self.wrapped_key_id = "kms:" + reply["KeyId"]
        return reply["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            # no KeyId: KMS reads the key from the blob, so a moved alias still opens what its old key wrapped
            # (which configured key may open which manifest was decided by `matches`)
            reply = self._kms().decrypt(CiphertextBlob=wrapped, EncryptionContext={"elastictrain": context.hex()})
        except Exception as exc:  # noqa: BLE001 - sorted by KMS's error code below
            code = _kms_code(exc)
            if code in _KMS_REFUSALS:
                raise WrongKey(f"KMS key {self.kms_key_id!r} cannot open the data key: {code}") from None
            raise _service_error(exc, f"to open the data key with {self.kms_key_id!r}") from None
        return reply["Plaintext"]

    def signing_seed(self) -> Optional[bytes]:
        return None


# KMS answers that say this key cannot open this data key (anything else, such as throttling or a
# network error, says nothing about the checkpoint).
_KMS_REFUSALS = frozenset({
    "AccessDeniedException", "IncorrectKeyException", "InvalidCiphertextException", "DisabledException",
    "NotFoundException", "KMSInvalidStateException", "InvalidKeyUsageException", "InvalidGrantTokenException",
})


def _service_error(exc: BaseException, doing: str) -> KeyServiceError:
    """KMS could not be asked at all: not an answer about the checkpoint (no fallback to an older one)."""
    kind = type(exc).__name__
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        hint = "no AWS credentials were found: set them (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance role)"
    elif kind == "NoRegionError":
        hint = "no AWS region is set: set AWS_DEFAULT_REGION"
    else:
        hint = "nothing is known about the checkpoint: try again"
    return KeyServiceError(f"KMS could not be asked {doing} ({_kms_code(exc) or kind}); {hint}")


def _kms_reason(exc: BaseException) -> str:
    """A KMS error as text: the service's own answer, or only the error's type for errors raised before the
    request left (botocore's parameter errors quote the parameters, the plaintext data key among them)."""
    code = _kms_code(exc)
    if code:
        return f"{code}: {exc}"
    return type(exc).__name__


def _kms_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


MAX_KEY_FILE_BYTES = 4096  # a key file holds 44 characters; anything this big is the wrong file
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _is_hex_key(text: str) -> bool:
    """Whether `text` is 32 bytes written in hex."""
    text = text.strip()
    return len(text) == 2 * crypto.KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in text)


def _looks_like_key(text: str) -> bool:
    """Whether the text after a spec's scheme is a key itself (base64 or hex of 32 bytes), not a name of one."""
    if _is_hex_key(text):
        return True
    try:
        return len(base64.b64decode(text.strip(), validate=True)) == crypto.KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def _check_reference(scheme: str, ref: str) -> None:
    """Refuse, without echoing it, a spec's reference that is a key pasted in place of its name
    (`env:$KEY` typed for `env:KEY`): every later error names the reference."""
    if _looks_like_key(ref) or (scheme == "env" and not _ENV_NAME.match(ref)):
        what = {"env": "an environment variable's name", "file": "a path", "kms": "a KMS key id"}[scheme]
        raise KeySpecError(
            f"key spec '{scheme}:...' does not hold {what} ({len(ref)} characters, not shown): name where the key "
            "is kept (env:VAR, file:PATH), not the key itself"
        )


def resolve_secret(spec: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The 32 bytes named by an 'env:VAR' or 'file:PATH' spec.

    Raises:
        KeySpecError: unknown scheme, unset variable, unreadable file, not base64 or not 32 bytes.
    """
    environ = os.environ if environ is None else environ
    scheme, _, ref = spec.partition(":")
    if scheme in ("env", "file"):
        _check_reference(scheme, ref)
    if scheme == "env":
        if ref not in environ:
            raise KeySpecError(f"environment variable {ref} (key spec env:{ref}) is unset: export it")
        return decode_key(environ[ref], f"environment variable {ref}")
    if scheme == "file":
        try:
            with open(os.path.expanduser(ref), "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise KeySpecError(f"key file {ref} is not a regular file")
                data = fh.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeySpecError(f"key file {ref} cannot be read: {type(exc).__name__}") from None
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeySpecError(
                f"key file {ref} is over {MAX_KEY_FILE_BYTES} bytes: a key is 44 base64 characters (the wrong file?)"
            )
        try:
            if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16, as Windows PowerShell's `>` writes
                text = data.decode("utf-16")
            else:
                text = data.decode("utf-8-sig")  # an editor's byte-order mark is not part of the key
        except UnicodeDecodeError:
            raise KeySpecError(
                f"key file {ref} holds {len(data)} raw bytes, not base64 text: store `base64 < {ref}` instead, "
                "or make a key with `elastictrain ckpt keygen`"
            ) from None
        return decode_key(text, f"key file {ref}")
    raise KeySpecError(f"{_unshown(spec)}: only 'env:VAR' and 'file:PATH' hold raw keys")


def resolve_key(
    spec: str, environ: Mapping[str, str] | None = None, random_bytes: Callable[[int], bytes] = secrets.token_bytes
) -> KeySource:
    """The key source a spec names ('env:VAR', 'file:PATH' or 'kms:KEY_ID')."""
    scheme, _, ref = spec.partition(":")
    if scheme == "kms":
        if not ref:
            raise KeySpecError("key spec 'kms:' needs a key id, e.g. kms:alias/training")
        _check_reference(scheme, ref)
        return KmsKey(ref)
    if scheme in ("env", "file"):
        return LocalKey(resolve_secret(spec, environ), random_bytes)
    raise KeySpecError(f"{_unshown(spec)} is not 'env:VAR', 'file:PATH' or 'kms:KEY_ID'")


def _unshown(spec: str) -> str:
    """How a bad spec is named in errors: its scheme when it has a known one, never its text (it may be a key)."""
    scheme, sep, _ = spec.partition(":")
    if sep and scheme in ("env", "file", "kms"):
        return f"key spec '{scheme}:...'"
    return f"a key spec ({len(spec)} characters, not shown)"


@dataclass
class Keyring:
    """The current key (writes) and older ones (reads of checkpoints from before a rotation)."""

    current: KeySource
    old: list[KeySource] = field(default_factory=list)
    signer: Optional[crypto.Signer] = None  # set when a signing key is given on its own

    def find(self, key_id: str) -> KeySource:
        for source in [self.current, *self.old]:
            if source.key_id == key_id:
                return source
        for source in [self.current, *self.old]:
            if isinstance(source, KmsKey) and source.matches(key_id):
                return source
        known = ", ".join(s.key_id for s in [self.current, *self.old])
        raise WrongKey(
            f"checkpoint was written under key id {key_id}; the configured keys are {known}: "
            "pass that key (or add it to old_keys)"
        )

    def signer_for(self, source: KeySource, data_key: bytes) -> crypto.Signer:
        """The manifest signer: given on its own, else derived from the key, else from the data key."""
        if self.signer is not None:
            return self.signer
        seed = source.signing_seed()
        return crypto.Signer(seed if seed is not None else crypto.DataKeys(data_key).signing_seed)


def keyring_from_specs(
    key: str,
    old_keys: Sequence[str] = (),
    signing_key: str | None = None,
    environ: Mapping[str, str] | None = None,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> Keyring:
    """Resolve every spec of an EncryptionConfig into a Keyring."""
    signer = crypto.Signer(resolve_secret(signing_key, environ)) if signing_key else None
    old = [resolve_key(s, environ, random_bytes) for s in old_keys]
    return Keyring(resolve_key(key, environ, random_bytes), old, signer)
