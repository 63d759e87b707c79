"""Key specs and the keyring."""

from __future__ import annotations

import base64
import os

import pytest

from elastictrain.checkpoint.keys import (
    KmsKey, LocalKey, generate_key, keyring_from_specs, resolve_key, resolve_secret,
)
from elastictrain.errors import KeySpecError, WrongKey


def test_env_and_file_specs(tmp_path):
    key = generate_key()
    raw = base64.b64decode(key)
    assert len(raw) == 32 and resolve_secret("env:K", {"K": key}) == raw
    path = tmp_path / "key"
    path.write_text(key + "\n")
    assert resolve_secret(f"file:{path}") == raw
    assert isinstance(resolve_key("kms:alias/x"), KmsKey)


@pytest.mark.parametrize(
    "spec,env,match",
    [
        ("env:MISSING", {}, "unset"),
        ("env:K", {"K": "not base64!"}, "not base64"),
        ("env:K", {"K": base64.b64encode(b"short").decode()}, "5 bytes"),
        ("file:/nonexistent/key", {}, "cannot be read"),
        ("kms:", {}, "needs a key id"),
        ("vault:x", {}, "is not"),
    ],
)
def test_bad_specs_say_what_to_fix(spec, env, match):
    with pytest.raises(KeySpecError, match=match):
        resolve_key(spec, env)


def test_key_never_appears_in_ids_or_reprs():
    secret = os.urandom(32)
    key = LocalKey(secret)
    b64 = base64.b64encode(secret).decode()
    for text in (key.key_id, repr(key)):
        assert b64 not in text and secret.hex() not in text


def test_keyring_finds_old_keys_and_names_missing_ones():
    old, new = generate_key(), generate_key()
    env = {"OLD": old, "NEW": new}
    ring = keyring_from_specs("env:NEW", ["env:OLD"], environ=env)
    old_id = LocalKey(base64.b64decode(old)).key_id
    assert ring.find(old_id).key_id == old_id
    dk = os.urandom(32)
    assert ring.find(old_id).unwrap(ring.old[0].wrap(dk, b"ctx"), b"ctx") == dk
    only_new = keyring_from_specs("env:NEW", environ=env)
    with pytest.raises(WrongKey, match="old_keys"):
        only_new.find(old_id)


def test_signing_key_given_on_its_own_overrides_derivation():
    env = {"K": generate_key(), "S": generate_key()}
    derived = keyring_from_specs("env:K", environ=env)
    given = keyring_from_specs("env:K", signing_key="env:S", environ=env)
    dk = os.urandom(32)
    assert derived.signer_for(derived.current, dk).key_id != given.signer_for(given.current, dk).key_id


def test_a_key_given_in_place_of_a_spec_never_appears_in_the_error():
    from elastictrain.config import EncryptionConfig

    secret = base64.b64encode(os.urandom(32)).decode()
    for call in (lambda: EncryptionConfig(key=secret), lambda: resolve_key(secret), lambda: resolve_secret(secret),
                 lambda: resolve_key("x" + secret + ":y")):
        with pytest.raises((KeySpecError, ValueError)) as err:
            call()
        assert secret not in str(err.value) and "not shown" in str(err.value)


def test_key_files_with_a_bom_raw_bytes_or_hex(tmp_path):
    key = os.urandom(32)
    path = tmp_path / "k"
    path.write_bytes(b"\xef\xbb\xbf" + base64.b64encode(key) + b"\n")  # saved by an editor that adds a BOM
    assert resolve_secret(f"file:{path}") == key
    path.write_bytes(bytes([0xFF]) + key[1:])
    with pytest.raises(KeySpecError, match="raw bytes, not base64"):
        resolve_secret(f"file:{path}")
    path.write_text(key.hex())
    with pytest.raises(KeySpecError, match="looks like hex"):
        resolve_secret(f"file:{path}")
    path.write_bytes((base64.b64encode(key).decode() + "\r\n").encode("utf-16"))  # PowerShell's `keygen > k`
    assert resolve_secret(f"file:{path}") == key
    path.write_bytes(b"x" * (1 << 20))  # the wrong file: read no further than a key could be
    with pytest.raises(KeySpecError, match="over 4096 bytes"):
        resolve_secret(f"file:{path}")
    with pytest.raises(KeySpecError, match="not a regular file"):  # /dev/zero would never end
        resolve_secret("file:/dev/zero")


class _Kms:
    """Stands in for KMS where moto cannot: answers that it is throttled, or refuses the key."""

    ARN = "arn:aws:kms:us-east-1:123456789012:key/1111"

    def __init__(self, code=None, describe=None, arn=False):
        self.code, self.describe, self.arn = code, describe, arn

    def encrypt(self, KeyId, Plaintext, EncryptionContext):
        return {"CiphertextBlob": b"wrapped:" + Plaintext, **({"KeyId": self.ARN} if self.arn else {})}

    def describe_key(self, KeyId):
        if self.describe:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": self.describe, "Message": "no"}}, "DescribeKey")
        return {"KeyMetadata": {"Arn": self.ARN}}

    def decrypt(self, CiphertextBlob, EncryptionContext, KeyId=None):
        if self.code:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": self.code, "Message": "no"}}, "Decrypt")
        return {"Plaintext": CiphertextBlob.removeprefix(b"wrapped:")}


def test_kms_trouble_is_not_taken_for_a_wrong_key():
    import torch

    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig, EncryptionConfig
    from elastictrain.errors import CheckpointError, KeyServiceError

    cfg = CheckpointConfig(uri="memory://kms-trouble", async_save=False, encryption=EncryptionConfig(key="kms:k"))
    with CheckpointManager(cfg) as mgr:
        mgr.keyring.current._client = _Kms()
        for step in (1, 2):
            mgr.save({"w": torch.full((4,), float(step))}, None, step=step, term=0)
    with CheckpointManager(cfg) as mgr:
        mgr.keyring.current._client = _Kms("ThrottlingException")
        with pytest.raises(KeyServiceError, match="ThrottlingException"):  # not a fallback to step 1
            mgr.latest()
        assert not isinstance(KeyServiceError("x"), CheckpointError)
        mgr.keyring.current._client = _Kms("AccessDeniedException")
        with pytest.raises(WrongKey, match="AccessDeniedException"):
            mgr.latest()


def test_kms_trouble_resolving_an_alias_is_not_taken_for_a_wrong_key():
    import torch

    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig, EncryptionConfig
    from elastictrain.errors import KeyServiceError

    env = {"OLD": generate_key()}

    def manager(kms):
        enc = EncryptionConfig(key="kms:alias/training", old_keys=["env:OLD"])
        mgr = CheckpointManager(CheckpointConfig(uri="memory://kms-alias", async_save=False, encryption=enc), environ=env)
        mgr.keyring.current._client = kms
        return mgr

    old = CheckpointConfig(uri="memory://kms-alias", async_save=False, encryption=EncryptionConfig(key="env:OLD"))
    with CheckpointManager(old, environ=env) as mgr:
        mgr.save({"w": torch.full((4,), 1.0)}, None, step=1, term=0)
    with manager(_Kms(arn=True)) as mgr:  # a rotation to KMS: the manifest records the key's ARN
        mgr.save({"w": torch.full((4,), 2.0)}, None, step=2, term=0)
    for code in ("ThrottlingException", "InternalException"):
        with manager(_Kms(arn=True, describe=code)) as mgr:
            with pytest.raises(KeyServiceError, match=code):  # not WrongKey, and so no fallback to step 1
                mgr.latest()
    with manager(_Kms(arn=True, describe="AccessDeniedException")) as mgr:  # no kms:DescribeKey: Decrypt decides
        assert mgr.latest().step == 2
    with manager(_Kms(code="AccessDeniedException", arn=True, describe="AccessDeniedException")) as mgr:
        loaded = mgr.latest()  # KMS will open neither: this principal cannot read step 2
        assert loaded.step == 1 and "AccessDeniedException" in loaded.skipped[0][1]
    with manager(_Kms(arn=True, describe="NotFoundException")) as mgr:
        assert mgr.latest().step == 1  # the alias names no key: not the key of step 2


@pytest.mark.parametrize("scheme", ["env", "file", "kms"])
def test_a_key_typed_after_a_scheme_is_refused_without_being_shown(scheme, tmp_path):
    secret = generate_key()
    for spec_of in (lambda k: f"{scheme}:{k}", lambda k: f"{scheme}:{base64.b64decode(k).hex()}"):
        spec = spec_of(secret)
        with pytest.raises(KeySpecError, match="not shown") as err:
            resolve_key(spec, {secret: generate_key()})  # even where such a variable exists
        assert secret not in str(err.value) and spec.split(":", 1)[1] not in str(err.value)
        if scheme != "kms":
            with pytest.raises(KeySpecError, match="not shown"):
                keyring_from_specs("env:K", signing_key=spec, environ={"K": generate_key()})
    assert resolve_key("env:_TRAINING_KEY_2", {"_TRAINING_KEY_2": secret}).key_id.startswith("local:")


def test_a_kms_key_without_a_signing_key_is_warned_about(caplog):
    import logging

    from elastictrain.checkpoint import CheckpointManager
    from elastictrain.config import CheckpointConfig, EncryptionConfig

    environ = {"SIGN": base64.b64encode(bytes(32)).decode(), "KEY": base64.b64encode(bytes(range(32))).decode()}

    def make(**enc):
        cfg = CheckpointConfig(uri="memory://kms-warning", encryption=EncryptionConfig(**enc))
        with caplog.at_level(logging.WARNING, logger="elastictrain.checkpoint"):
            CheckpointManager(cfg, environ=environ).close()
        found = [r.getMessage() for r in caplog.records if "kms:Encrypt" in r.getMessage()]
        caplog.clear()
        return found

    assert make(key="kms:alias/training") and "signing_key" in make(key="kms:alias/training")[0]
    assert make(key="kms:alias/training", signing_key="env:SIGN") == []
    assert make(key="env:KEY") == []  # a local key derives the signing key from itself
