"""`elastictrain ckpt ls | verify | export | keygen`: inspect and extract checkpoints from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

from elastictrain.checkpoint.export import export_checkpoint, export_model, open_manager
from elastictrain.checkpoint.keys import generate_key
from elastictrain.checkpoint.manager import CheckpointInfo
from elastictrain.errors import CheckpointError


def list_checkpoints(uri: str, storage_options: Optional[dict] = None) -> list[CheckpointInfo]:
    """Every checkpoint under `uri`, oldest first (no key needed)."""
    mgr = open_manager(uri, None, storage_options)
    try:
        return mgr.list()
    finally:
        mgr.close()


def verify_checkpoints(
    uri: str, keys: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
    signing_key: Optional[str] = None,
) -> list[tuple[str, Optional[str]]]:
    """Fully read and check every checkpoint: [(manifest name, None if good else the reason)]."""
    mgr = open_manager(uri, keys, storage_options, signing_key)
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
    export = sub.add_parser(
        "export", help="write a checkpoint as one plain .safetensors file, or one model's weights (--model)"
    )
    export.add_argument("uri")
    export.add_argument("out", help="a .safetensors file; a folder with --hf-config")
    export.add_argument("--step", type=int, default=None, help="the step to export (default: newest that verifies)")
    export.add_argument("--key", action="append", help="key spec; repeat for old keys")
    export.add_argument("--signing-key", default=None, help="key spec of the run's own signing key, if it had one")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument("--model", default=None, metavar="NAME",
                        help="only the weights of this ctx.state() entry, under its plain state_dict() names")
    export.add_argument("--hf-config", default=None, metavar="ENTRY",
                        help="with --model: the state entry holding model.config.to_dict(); OUT becomes a folder "
                             "(config.json + model.safetensors) that transformers' from_pretrained reads")
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
    if cmd == "export" and (args.model is not None or args.hf_config is not None):
        if args.model is None:
            raise ValueError("--hf-config goes with --model NAME: the state entry whose weights to export")
        done = export_model(
            args.uri, args.out, args.model, args.step, args.key, signing_key=args.signing_key,
            overwrite=args.force, hf_config_entry=args.hf_config,
        )
        _print_skipped(done.skipped)
        what = f"{args.out} (config.json, model.safetensors)" if done.folder else args.out
        print(f"exported model {args.model!r} of step {done.step} ({len(done.names)} tensors) to {what}")
        return 0
    if cmd == "export":
        loaded = export_checkpoint(
            args.uri, args.out, args.step, args.key, signing_key=args.signing_key, overwrite=args.force
        )
        _print_skipped(loaded.skipped)
        print(f"exported step {loaded.step} ({len(loaded.tensors)} tensors) to {args.out}")
        return 0
    raise ValueError(f"unknown ckpt command {cmd!r}")


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for name, reason in skipped:  # newer ones that did not verify: say why this one was taken
        print(f"elastictrain ckpt export: skipped {name}: {reason}".splitlines()[0], file=sys.stderr)


__all__ = ["add_ckpt_parser", "run_ckpt", "list_checkpoints", "verify_checkpoints", "export_checkpoint", "export_model"]
