"""Storage credentials: hidden in reprs, errors and events; 'env:VAR' read where the storage is opened."""

from __future__ import annotations

import pickle

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import ValidationError

from elastictrain.checkpoint import CheckpointManager
from elastictrain.checkpoint.credentials import REDACTED, is_credential, redact_options, resolve_options
from elastictrain.checkpoint.keys import KmsKey
from elastictrain.checkpoint.storage import FsspecStorage
from elastictrain.config import CheckpointConfig, FailureConfig
from elastictrain.errors import KeySpecError, StorageCredentialError
from elastictrain.runtime.spec import RunSpec

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"
TOKEN = "sv=2026-01-01&sig=abcdefghijklmnop"


class CredFS(MemoryFileSystem):
    """An in-memory filesystem that keeps the options it was opened with (fsspec records them)."""

    protocol = ("credtest",)
    store: dict = {}
    pseudo_dirs = [""]
    fail_with = None  # what a write raises, when set
    fail_read = None  # (name, error): reading that name raises it

    def cat_file(self, path, *args, **kwargs):
        if self.fail_read is not None and path.endswith(self.fail_read[0]):
            raise self.fail_read[1]
        return super().cat_file(path, *args, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        if self.fail_with is not None:
            raise self.fail_with
        return super().pipe_file(path, value, **kwargs)


@pytest.fixture(autouse=True)
def credtest_protocol():
    fsspec.register_implementation("credtest", CredFS, clobber=True)
    CredFS.store.clear()
    CredFS.fail_with = CredFS.fail_read = None
    yield
    CredFS.fail_with = CredFS.fail_read = None


def _options(**extra):
    return {"key": ACCESS, "secret": SECRET, "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": TOKEN,
                              "headers": [{"Authorization": "Bearer " + TOKEN}]},
            "s3_additional_kwargs": {"SSEKMSKeyId": "alias/visible"}, **extra}


@pytest.mark.parametrize("name", [
    "key", "secret", "token", "password", "passwd", "aws_access_key_id", "aws_secret_access_key",
    "AWS_SESSION_TOKEN", "client_secret", "sas_token", "account_key", "connection_string", "credential",
    "SSECustomerKey", "Authorization", "passphrase", "pkey", "refresh-token", "api_key", "private_key",
])
def test_names_that_hold_credentials(name):
    assert is_credential(name)


@pytest.mark.parametrize("name", [
    "endpoint_url", "region_name", "anon", "use_ssl", "SSEKMSKeyId", "kms_key_id", "key_filename", "client_id",
    "account_name", "tenant_id", "username", "profile", "client_kwargs", "skip_instance_cache", "version_aware",
])
def test_names_that_do_not(name):
    assert not is_credential(name)


def test_repr_str_and_the_run_spec_hide_credentials_and_keep_everything_else():
    cfg = CheckpointConfig(uri="s3://bucket/run", storage_options=_options(password="env:STORE_PASSWORD"))
    spec = RunSpec(run_id="r", namespace="n", scaling=_default("ScalingConfig"), batch=_default("BatchConfig"),
                   checkpoint=cfg, failure=FailureConfig(), run=_default("RunConfig"))
    for text in (repr(cfg), str(cfg), f"{cfg}", f"{cfg!r}", repr(spec), str([cfg])):
        for secret in (SECRET, ACCESS, TOKEN):
            assert secret not in text
        assert REDACTED in text and "http://127.0.0.1:9" in text and "alias/visible" in text
        assert "env:STORE_PASSWORD" in text  # a reference is a name: shown as written
    assert cfg.storage_options["secret"] == SECRET  # the config itself still holds the values
    assert redact_options(cfg.storage_options)["client_kwargs"]["headers"][0]["Authorization"] == REDACTED


def _default(name):
    import elastictrain.config as config

    return getattr(config, name)()


def test_the_storage_opens_with_the_real_values_and_reads_env_references_where_it_opens():
    cfg = CheckpointConfig(uri="credtest://run", async_save=False,
                           storage_options=_options(secret="env:ET_TEST_SECRET"))
    assert SECRET.encode() not in pickle.dumps(cfg)  # what travels to the workers holds only the name
    with CheckpointManager(cfg, environ={"ET_TEST_SECRET": SECRET}) as mgr:
        opened = mgr.storage.fs.storage_options
        assert opened["secret"] == SECRET and opened["key"] == ACCESS
        assert opened["client_kwargs"]["aws_session_token"] == TOKEN
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
        assert mgr.latest().step == 1


def test_an_unset_variable_is_refused_naming_the_option_and_variable_only():
    with pytest.raises(StorageCredentialError) as info:
        FsspecStorage("credtest://run", {"key": ACCESS, "client_kwargs": {"aws_secret_access_key": "env:ET_UNSET"}},
                      environ={})
    text = str(info.value)
    assert "client_kwargs.aws_secret_access_key" in text and "ET_UNSET" in text and ACCESS not in text


def test_a_reference_that_names_no_variable_is_refused_without_echo():
    pasted = "env:" + SECRET  # a secret typed after 'env:' ('-' is not in variable names)
    with pytest.raises(ValidationError) as info:
        CheckpointConfig(uri="s3://bucket/run", storage_options={"secret": pasted})
    assert SECRET not in str(info.value) and "storage option secret" in str(info.value)
    with pytest.raises(StorageCredentialError):
        resolve_options({"token": pasted}, {})


def test_a_password_in_the_uri_is_refused_without_echo():
    with pytest.raises(ValidationError) as info:
        CheckpointConfig(uri=f"ftp://trainer:{SECRET}@files.example/run")
    assert SECRET not in str(info.value) and "storage_options" in str(info.value)
    CheckpointConfig(uri="abfs://container@account.dfs.core.windows.net/run")  # a user name alone is fine


def test_a_storage_error_that_echoes_a_credential_is_hidden_in_the_error_and_the_event():
    cfg = CheckpointConfig(uri="credtest://run", async_save=False, storage_options=_options())
    events = []
    with CheckpointManager(cfg, listener=events.append) as mgr:
        CredFS.fail_with = PermissionError(f"denied for key {ACCESS} with signature from {SECRET}")
        with pytest.raises(PermissionError) as info:  # the same type: callers that sort errors still can
            mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
    failed = [e for e in events if e["kind"] == "checkpoint_failed"]
    assert failed and all(s not in failed[0]["reason"] for s in (ACCESS, SECRET))
    assert REDACTED in failed[0]["reason"]
    assert ACCESS not in str(info.value) and SECRET not in str(info.value) and REDACTED in str(info.value)


def test_opening_a_filesystem_that_echoes_a_credential_hides_it():
    class Echoing(MemoryFileSystem):
        protocol = ("echotest",)

        def __init__(self, **options):
            raise ValueError(f"bad options {options}")

    fsspec.register_implementation("echotest", Echoing, clobber=True)
    with pytest.raises(ValueError) as info:
        FsspecStorage("echotest://run", {"secret": SECRET, "skip_instance_cache": True})
    assert SECRET not in str(info.value) and REDACTED in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_kms_wrap_errors_do_not_quote_the_request():
    data_key = bytes(range(32))

    class QuotingClient:  # botocore's parameter errors quote the parameters
        def encrypt(self, **request):
            raise TypeError(f"Invalid type for parameter Plaintext, value: {request['Plaintext']!r}")

    with pytest.raises(KeySpecError) as info:
        KmsKey("alias/k", client=QuotingClient()).wrap(data_key, b"ctx")
    assert repr(data_key) not in str(info.value) and "TypeError" in str(info.value)


def test_a_listed_checkpoint_whose_read_error_echoes_a_credential_hides_it():
    cfg = CheckpointConfig(uri="credtest://run", async_save=False, storage_options=_options())
    with CheckpointManager(cfg) as mgr:
        mgr.save({"w": torch.ones(3)}, None, step=1, term=0)
        mgr.save({"w": torch.full((3,), 2.0)}, None, step=2, term=0)
        newest = mgr.list()[-1].name
        CredFS.fail_read = (newest, FileNotFoundError(f"gone, said the server to {ACCESS}:{SECRET}"))
        listed = mgr.list()
        loaded = mgr.latest()
    assert loaded.step == 1 and [s for s, _ in loaded.skipped] == [newest]
    assert listed[-1].error and ACCESS not in listed[-1].error and SECRET not in listed[-1].error
    assert REDACTED in listed[-1].error
