"""Exports: a verified checkpoint as plain files other tools read, installed whole or not at all.

- `export_checkpoint`: the whole state as one .safetensors file (`safetensors.torch.load_file`).
- `export_model`: one model's weights under its plain `state_dict()` names, as a .safetensors file
  (`model.load_state_dict(load_file(OUT))`), or with a stored `transformers` config as a folder
  (config.json + model.safetensors) that `AutoModelForCausalLM.from_pretrained(OUT)` reads.

Everything is written under a temporary name next to OUT and moved into place last. An existing
OUT is refused unless `overwrite`. The export of an encrypted checkpoint is plaintext: files are
created readable by their owner only (0600, folders 0700).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from elastictrain.checkpoint import codec
from elastictrain.checkpoint.manager import CheckpointManager
from elastictrain.checkpoint.reader import Loaded
from elastictrain.checkpoint.weights import config_json, hf_config, model_weights, state_entries
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# What a model folder export writes; `overwrite` replaces a folder holding nothing else.
FOLDER_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE})


@dataclass
class ModelExport:
    """What `export_model` wrote: the step, the tensor names, and the newer checkpoints it skipped."""

    step: int
    names: list[str]
    folder: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)


def open_manager(
    uri: str, keys: Optional[Sequence[str]], storage_options: Optional[dict] = None, signing_key: Optional[str] = None
) -> CheckpointManager:
    """A synchronous CheckpointManager for `uri`, with the first key current and the rest old keys.

    `signing_key` without keys: a plaintext run's signing key (manifests it did not sign are refused).
    """
    enc = EncryptionConfig(key=keys[0], old_keys=list(keys[1:]), signing_key=signing_key) if keys else None
    return CheckpointManager(CheckpointConfig(
        uri=uri, encryption=enc, signing_key=None if keys else signing_key, async_save=False,
        storage_options=storage_options or {},
    ))


def load_checkpoint(
    uri: str, step: Optional[int], keys: Optional[Sequence[str]], storage_options: Optional[dict],
    signing_key: Optional[str],
) -> Loaded:
    """The checkpoint of `step` (default: the newest that verifies), fully verified, on CPU."""
    mgr = open_manager(uri, keys, storage_options, signing_key)
    try:
        loaded = mgr.latest() if step is None else mgr.load(step)
    finally:
        mgr.close()
    if loaded is None:
        raise CheckpointError(f"no checkpoint under {uri}")
    return loaded


def export_checkpoint(
    uri: str, out: str, step: Optional[int] = None, keys: Optional[Sequence[str]] = None,
    storage_options: Optional[dict] = None, signing_key: Optional[str] = None, overwrite: bool = False,
) -> Loaded:
    """Write a verified checkpoint as one plain .safetensors file (`safetensors.torch.load_file` reads it).

    An existing `out` is refused unless `overwrite`. The export of an encrypted checkpoint is the
    plaintext: it is created readable by its owner only (0600).
    """
    if not overwrite and os.path.lexists(out):
        raise _exists(out)
    loaded = load_checkpoint(uri, step, keys, storage_options, signing_key)
    tmp = _tmp_name(out)
    try:
        with _create(tmp, private=bool(keys)) as fh:
            fh.write(loaded.header)
            for tensor in loaded.tensors.values():
                fh.write(codec.byte_view(tensor))
        install_file(tmp, out, overwrite)
    finally:
        _remove(tmp)
    return loaded


def export_model(
    uri: str, out: str, model: str, step: Optional[int] = None, keys: Optional[Sequence[str]] = None,
    storage_options: Optional[dict] = None, signing_key: Optional[str] = None, overwrite: bool = False,
    hf_config_entry: Optional[str] = None,
) -> ModelExport:
    """Write the weights of the state entry `model` (the name given to `ctx.state(model=...)`).

    Without `hf_config_entry`, `out` is one .safetensors file under the plain module's state_dict
    names: `module.load_state_dict(safetensors.torch.load_file(out))` reads it. With it (the name of
    a state entry holding `model.config.to_dict()`), `out` is a folder holding config.json and
    model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained(out)` reads. Tied
    weights (say, an embedding shared with the output layer) are written once per name, so a
    strict `load_state_dict` finds every name; `from_pretrained` ties them again.

    Raises:
        UnknownStateEntry, NotExportable: no such entry, or it is not a model's weights / a config.
        FileExistsError: `out` exists and `overwrite` is not set.
        CheckpointError: no checkpoint, or none that verifies.

    Example:
        >>> export_model("file:///runs/gpt", "gpt-hf", "model", hf_config_entry="hf_config")  # doctest: +SKIP
    """
    if not overwrite and os.path.lexists(out):
        raise _exists(out)
    loaded = load_checkpoint(uri, step, keys, storage_options, signing_key)
    entries = state_entries(loaded.tensors, loaded.skeleton)
    weights = model_weights(entries, model)
    config = config_json(hf_config(entries, hf_config_entry)) if hf_config_entry is not None else None
    private = bool(keys)
    if config is None:
        write_weights_file(weights, out, overwrite=overwrite, private=private)
    else:
        write_model_folder(weights, config, out, overwrite=overwrite, private=private)
    return ModelExport(loaded.step, list(weights), folder=config is not None, skipped=loaded.skipped)


def write_weights_file(weights: Mapping[str, torch.Tensor], out: str, *, overwrite: bool, private: bool) -> None:
    """Write `weights` as one .safetensors file at `out` (metadata format=pt, as transformers expects)."""
    tmp = _tmp_name(out)
    try:
        _write_safetensors(weights, tmp, private)
        install_file(tmp, out, overwrite)
    finally:
        _remove(tmp)


def write_model_folder(
    weights: Mapping[str, torch.Tensor], config: str, out: str, *, overwrite: bool, private: bool
) -> None:
    """Write a `from_pretrained` folder (config.json, model.safetensors) at `out`, whole or not at all."""
    tmp = _tmp_name(out)
    try:
        os.mkdir(tmp, 0o700 if private else 0o777)
        _write_safetensors(weights, os.path.join(tmp, WEIGHTS_FILE), private)
        with _create(os.path.join(tmp, CONFIG_FILE), private) as fh:
            fh.write(config.encode())
        install_folder(tmp, out, overwrite)
    finally:
        _remove(tmp)


def install_file(tmp: str, out: str, overwrite: bool) -> None:
    """Move the finished `tmp` to `out`; without `overwrite`, only where nothing is (checked as it links)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if `out` appeared while the checkpoint was read
    except FileExistsError:
        raise _exists(out) from None
    except OSError:  # a file system without hard links
        if os.path.lexists(out):
            raise _exists(out) from None
        os.replace(tmp, out)


def install_folder(tmp: str, out: str, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `out`.

    Without `overwrite`, only where nothing is (a rename over a non-empty folder or a file fails; the
    only thing it can replace is an empty folder that appeared meanwhile). With it, an existing file or
    earlier export folder is moved aside, the new one moved in, and the old one removed; a folder
    holding anything an export does not write is refused, so --force never deletes other files.
    """
    if overwrite and os.path.lexists(out):
        if os.path.isdir(out) and not os.path.islink(out):
            others = sorted(set(os.listdir(out)) - FOLDER_FILES)
            if others:
                raise FileExistsError(
                    f"{out} is a folder holding other files ({', '.join(others[:3])}): --force replaces only an "
                    "earlier export; remove it yourself or pick another OUT"
                )
        old = _tmp_name(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the earlier export back
            raise
        _remove(old)
        return
    if os.path.lexists(out):
        raise _exists(out)
    try:
        os.rename(tmp, out)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise _exists(out) from None
    except OSError as exc:
        if os.path.lexists(out):  # ENOTEMPTY: a folder appeared there meanwhile
            raise _exists(out) from None
        raise exc


def _write_safetensors(weights: Mapping[str, torch.Tensor], path: str, private: bool) -> None:
    """Header and tensor bytes, one name after another; names sharing storage are written once each."""
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in weights.items()}
    entries = codec.plan_entries(cpu)
    with _create(path, private) as fh:
        fh.write(codec.encode_header(entries, {"format": "pt"}))
        for tensor in cpu.values():
            fh.write(codec.byte_view(tensor))


def _create(path: str, private: bool):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    return open(fd, "wb")


def _tmp_name(out: str, kind: str = "tmp") -> str:
    return f"{out.rstrip(os.sep) or out}.{kind}-{secrets.token_hex(4)}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _exists(out: str) -> FileExistsError:
    return FileExistsError(f"{out} exists: remove it, or pass --force to replace it")


__all__ = ["ModelExport", "export_checkpoint", "export_model", "write_weights_file", "write_model_folder"]
