"""Credentials in `CheckpointConfig.storage_options`: which options hold one, how they are shown, where they come from.

An option holds a credential when its name says so (case, '_' and '-' ignored): it contains
'secret', 'token', 'password', 'passphrase', 'credential', 'auth', 'cookie', 'signature' or
'connectionstring'; or it ends in 'key' (s3fs's `key` is the access key id, `secret` its secret;
`account_key`, `SSECustomerKey`, `pkey`) or in 'accesskeyid'. Names ending in another 'keyid'
(`SSEKMSKeyId`, `kms_key_id`) name a key without holding it and are shown. Nested mappings and
lists (`client_kwargs`, `config_kwargs`, `headers`) are searched the same way.

A credential's value may be `"env:VAR"`: the storage reads the variable on the machine that opens
the filesystem, so the secret is never in the config, its repr or the actor arguments. Reprs show
such a reference as it is (it is a name) and any other credential value as `REDACTED`.

Pure: no fsspec, no I/O but the environment mapping it is handed.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Optional

from elastictrain.errors import CheckpointError, StorageCredentialError

REDACTED = "<redacted>"
ENV_PREFIX = "env:"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORDS = ("secret", "token", "password", "passwd", "passphrase", "credential", "auth", "cookie", "signature",
          "connectionstring")
MIN_SCRUB_CHARS = 6
"""Shorter credential values are not searched for in messages: they would match ordinary words."""


def is_credential(name: object) -> bool:
    """Whether a storage option of this name holds a credential (see the module doc)."""
    n = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if any(word in n for word in _WORDS):
        return True
    if n.endswith("accesskeyid"):  # half of an access key pair: hidden with the other half
        return True
    if n.endswith("keyid"):
        return False
    return n.endswith("key")


def _is_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith(ENV_PREFIX)


def _shown(value: object) -> object:
    """How a credential's value appears in a repr: a reference as written, anything else hidden."""
    if value is None or isinstance(value, bool) or (_is_reference(value) and _ENV_NAME.match(value[4:])):
        return value
    return REDACTED


def _walk(value: Any, on_credential, path: str) -> Any:
    """A copy of `value` with every credential option's value replaced by `on_credential(value, path)`."""
    if isinstance(value, Mapping):
        return {
            k: on_credential(v, f"{path}{k}") if is_credential(k) else _walk(v, on_credential, f"{path}{k}.")
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = [_walk(v, on_credential, f"{path}{i}.") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` as reprs, errors and events may show them: credential values hidden, `env:` references kept."""
    return _walk(options, lambda value, _path: _shown(value), "")


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse an `env:` credential reference that does not name a variable, without echoing it.

    Raises:
        StorageCredentialError: which option (by name) holds it.
    """

    def check(value: object, path: str) -> object:
        if _is_reference(value) and not _ENV_NAME.match(value[len(ENV_PREFIX):]):
            raise StorageCredentialError(
                f"storage option {path} starts with 'env:' but does not name an environment variable "
                f"({len(value)} characters, not shown): write env:VAR_NAME and keep the secret in that variable"
            )
        return value

    _walk(options, check, "")


def resolve_options(options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`options` with each `env:VAR` credential replaced by that variable's value in `environ`.

    Raises:
        StorageCredentialError: a variable named is unset (the message names the option and the
            variable, never a value).
    """
    check_options(options)

    def resolve(value: object, path: str) -> object:
        if not _is_reference(value):
            return value
        var = value[len(ENV_PREFIX):]
        if var not in environ:
            raise StorageCredentialError(
                f"storage option {path} is read from environment variable {var}, which is unset on this "
                "machine: export it where the workers run"
            )
        return environ[var]

    return _walk(options, resolve, "")


def credential_values(options: Mapping[str, Any]) -> list[str]:
    """The text of every credential value in (resolved) `options`, longest first, for `scrub`."""
    found: list[str] = []

    def collect(value: object, _path: str) -> object:
        for text in _texts(value):
            if len(text) >= MIN_SCRUB_CHARS and not _is_reference(text):
                found.append(text)
        return value

    _walk(options, collect, "")
    return sorted(set(found), key=len, reverse=True)


def _texts(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray)):
        yield bytes(value).decode("utf-8", "replace")
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of a secret replaced by `REDACTED` (for messages that may echo options)."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_error(exc: BaseException, secrets: list[str]) -> Optional[BaseException]:
    """None if `exc`'s message shows no secret; else an error of the same type, or a CheckpointError,
    whose message shows `REDACTED` in its place."""
    message = str(exc)
    clean = scrub(message, secrets)
    if clean == message:
        return None
    try:
        replacement: BaseException = type(exc)(clean)
        if str(replacement) != clean:
            raise TypeError("another message")
    except Exception:  # noqa: BLE001 - a type built from other arguments (botocore's): the text is enough
        replacement = CheckpointError(f"{type(exc).__name__}: {clean}")
    return replacement
