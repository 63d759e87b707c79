"""`elastictrain ckpt ls | verify | export | keygen`: inspect and extract checkpoints from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from typing import Optional, Sequence

from elastictrain.checkpoint.keys import generate_key
from elastictrain.checkpoint.manager import CheckpointInfo, CheckpointManager
from elastictrain.checkpoint.reader import Loaded
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.errors import CheckpointError


def _manager(
    uri: str, keys: Optional[Sequence[str]], storage_options: Optional[dict] = None, signing_key: Optional[str] = None
) -> CheckpointManager:
    if signing_key and not keys:
        raise ValueError("--signing-key goes with --key: the checkpoint's own key opens its data key")
    enc = EncryptionConfig(key=keys[0], old_keys=list(keys[1:]), signing_key=signing_key) if keys else None
    return CheckpointManager(
        CheckpointConfig(uri=uri, encryption=enc, async_save=False, storage_options=storage_options or {})
    )


def list_checkpoints(uri: str, storage_options: Optional[dict] = None) -> list[CheckpointInfo]:
    """Every checkpoint under `uri`, oldest first (no key needed)."""
    mgr = _manager(uri, None, storage_options)
    try:
        return mgr.list()
    finally:
        mgr.close()


def verify_checkpoints(
    uri: str, keys: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
    signing_key: Optional[str] = None,
) -> list[tuple[str, Optional[str]]]:
    """Fully read and check every checkpoint: [(manifest name, None if good else the reason)]."""
    mgr = _manager(uri, keys, storage_options, signing_key)
    results = []
    try:
        for info in mgr.list():
            try:
                mgr.load_manifest(info.name)
                results.append((info.name, None))
            except CheckpointError as exc:
                results.append((info.name, f"{type(exc).__name__}: {exc}"))
    finally:
        mgr.close()
    return results


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
    mgr = _manager(uri, keys, storage_options, signing_key)
    try:
        loaded = mgr.latest() if step is None else mgr.load(step)
    finally:
        mgr.close()
    if loaded is None:
        raise CheckpointError(f"no checkpoint under {uri}")
    tmp = f"{out}.tmp-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if keys else 0o666)
        with open(fd, "wb") as fh:
            fh.write(loaded.header)
            for tensor in loaded.tensors.values():
                if tensor.numel():
                    fh.write(_raw(tensor))
        _install(tmp, out, overwrite)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return loaded


def _install(tmp: str, out: str, overwrite: bool) -> None:
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


def _exists(out: str) -> FileExistsError:
    return FileExistsError(f"{out} exists: remove it, or pass --force to replace it")


def _raw(tensor) -> memoryview:
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def add_ckpt_parser(subparsers) -> None:
    """Register `ckpt` and its subcommands on the top-level parser."""
    ckpt = subparsers.add_parser("ckpt", help="list, verify, export checkpoints; make a key")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ls = sub.add_parser("ls", help="list the checkpoints under a URI")
    ls.add_argument("uri")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    verify = sub.add_parser("verify", help="read and check every checkpoint under a URI")
    verify.add_argument("uri")
    verify.add_argument("--key", action="append", help="key spec (env:VAR, file:PATH, kms:KEY_ID); repeat for old keys")
    verify.add_argument("--signing-key", default=None, help="key spec of the run's own signing key, if it had one")
    export = sub.add_parser("export", help="write a checkpoint as one plain .safetensors file")
    export.add_argument("uri")
    export.add_argument("out")
    export.add_argument("--step", type=int, default=None, help="the step to export (default: newest that verifies)")
    export.add_argument("--key", action="append", help="key spec; repeat for old keys")
    export.add_argument("--signing-key", default=None, help="key spec of the run's own signing key, if it had one")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    sub.add_parser("keygen", help="print a new random 32-byte key, base64 (for env: or file: specs)")


def run_ckpt(args: argparse.Namespace) -> int:
    """Run a `ckpt` subcommand; errors propagate to the caller, which prints one line."""
    cmd = args.ckpt_command
    logging.getLogger("elastictrain.checkpoint").setLevel(logging.ERROR)  # reasons are printed once, below
    if cmd == "keygen":
        print(generate_key())
        return 0
    if cmd == "ls":
        infos = list_checkpoints(args.uri)
        if args.json:
            for info in infos:
                print(json.dumps(info.__dict__))
            return 0
        if not infos:
            print(f"no checkpoints under {args.uri}")
            return 0
        print(f"{'step':>10} {'term':>6} {'time (UTC)':<20} {'size':>12} {'encrypted':<9} key id")
        for i in infos:
            if i.error:
                print(f"{i.step:>10} {i.term:>6} {'-':<20} {'-':>12} {'-':<9} DAMAGED: {i.error}")
                continue
            try:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.time_ns / 1e9))
            except (OverflowError, OSError, ValueError):  # a forged or damaged time: shown, not fatal
                when = "?"
            print(f"{i.step:>10} {i.term:>6} {when:<20} {i.size:>12} {str(i.encrypted).lower():<9} {i.key_id or '-'}")
        return 0
    if cmd == "verify":
        results = verify_checkpoints(args.uri, args.key, signing_key=args.signing_key)
        if not results:
            raise CheckpointError(f"no checkpoints under {args.uri}")
        for name, problem in results:
            print(f"{name}: {'ok' if problem is None else problem}")
        bad = [r for r in results if r[1] is not None]
        if bad:
            print(f"elastictrain ckpt verify: {len(bad)} of {len(results)} checkpoints fail: {bad[0][1]}",
                  file=sys.stderr)
            return 1
        return 0
    if cmd == "export":
        loaded = export_checkpoint(
            args.uri, args.out, args.step, args.key, signing_key=args.signing_key, overwrite=args.force
        )
        for name, reason in loaded.skipped:  # newer ones that did not verify: say why this one was taken
            print(f"elastictrain ckpt export: skipped {name}: {reason}".splitlines()[0], file=sys.stderr)
        print(f"exported step {loaded.step} ({len(loaded.tensors)} tensors) to {args.out}")
        return 0
    raise ValueError(f"unknown ckpt command {cmd!r}")


__all__ = ["add_ckpt_parser", "run_ckpt", "list_checkpoints", "verify_checkpoints", "export_checkpoint"]
