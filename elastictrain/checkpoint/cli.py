"""`elastictrain ckpt ls | verify | export | keygen`: inspect and extract checkpoints from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from elastictrain.checkpoint.export import export_checkpoint, export_model, open_manager
from elastictrain.checkpoint.keys import generate_key
from elastictrain.checkpoint.manager import CheckpointInfo
from elastictrain.checkpoint.provenance import summary as provenance_summary
from elastictrain.errors import CheckpointError


def list_checkpoints(uri: str, storage_options: Optional[dict] = None) -> list[CheckpointInfo]:
    """Every checkpoint under `uri`, oldest first (no key needed)."""
    mgr = open_manager(uri, None, storage_options)
    try:
        return mgr.list()
    finally:
        mgr.close()


@dataclass
class VerifyReport:
    """What `elastictrain ckpt verify` found under a URI.

    `results`: (manifest name, None if it verified in full else the reason), oldest first.
    `unverifiable`: manifests whose signature or identity does not verify as the run's (planted, edited,
    another key's, damaged manifests): retention never counts or deletes them. `damaged`: manifests that
    verify but whose chunks do not. `newest_step`: the newest step that verified in full (None: none).
    """

    results: list[tuple[str, Optional[str]]] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    newest_step: Optional[int] = None
    expected_step: Optional[int] = None

    @property
    def verified(self) -> list[str]:
        return [name for name, problem in self.results if problem is None]

    @property
    def rolled_back(self) -> bool:
        """The newest verified step is older than the expected newest (`--expect-step`)."""
        return self.expected_step is not None and (self.newest_step is None or self.newest_step < self.expected_step)


def verify_report(
    uri: str, keys: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
    signing_key: Optional[str] = None, expect_step: Optional[int] = None,
) -> VerifyReport:
    """Check every checkpoint: its manifest's signature and identity first, then, for those, every chunk.

    `expect_step`: the newest step the run committed (its last `checkpoint` event, or the record kept
    outside the storage); the report says when the newest that verifies is older.
    """
    mgr = open_manager(uri, keys, storage_options, signing_key)
    report = VerifyReport(expected_step=expect_step)
    try:
        for checked in mgr.check_manifests():
            problem = checked.problem
            if problem is not None:
                report.unverifiable.append(checked.name)
            else:
                try:
                    loaded = mgr.load_manifest(checked.name)
                    report.newest_step = max(loaded.step, report.newest_step or 0)
                except CheckpointError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                    report.damaged.append(checked.name)
            report.results.append((checked.name, problem))
    finally:
        mgr.close()
    return report


def verify_checkpoints(
    uri: str, keys: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
    signing_key: Optional[str] = None,
) -> list[tuple[str, Optional[str]]]:
    """Fully read and check every checkpoint: [(manifest name, None if good else the reason)]."""
    return verify_report(uri, keys, storage_options, signing_key).results


def add_ckpt_parser(subparsers) -> None:
    """Register `ckpt` and its subcommands on the top-level parser."""
    ckpt = subparsers.add_parser("ckpt", help="list, verify, export checkpoints; make a key")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ls = sub.add_parser("ls", help="list the checkpoints under a URI")
    ls.add_argument("uri")
    ls.add_argument("--json", action="store_true",
                    help="one JSON object per line, with provenance, lineage and attestation in full")
    verify = sub.add_parser("verify", help="read and check every checkpoint under a URI")
    verify.add_argument("uri")
    verify.add_argument("--key", action="append", help="key spec (env:VAR, file:PATH, kms:KEY_ID); repeat for old keys")
    verify.add_argument("--signing-key", default=None,
                        help="key spec of the run's own signing key, if it had one (alone: a signed plaintext run)")
    verify.add_argument("--expect-step", type=int, default=None, metavar="N",
                        help="the newest step the run committed (its last `checkpoint` event): report a gap")
    export = sub.add_parser(
        "export", help="write a checkpoint as one plain .safetensors file, or one model's weights (--model)"
    )
    export.add_argument("uri")
    export.add_argument("out", help="a .safetensors file; a folder with --hf-config")
    export.add_argument("--step", type=int, default=None, help="the step to export (default: newest that verifies)")
    export.add_argument("--key", action="append", help="key spec; repeat for old keys")
    export.add_argument("--signing-key", default=None,
                        help="key spec of the run's own signing key, if it had one (alone: a signed plaintext run)")
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
        print(f"{'step':>10} {'term':>6} {'time (UTC)':<20} {'size':>12} {'encrypted':<9} {'key id':<16} provenance")
        for i in infos:
            if i.error:
                print(f"{i.step:>10} {i.term:>6} {'-':<20} {'-':>12} {'-':<9} DAMAGED: {i.error}")
                continue
            try:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.time_ns / 1e9))
            except (OverflowError, OSError, ValueError):  # a forged or damaged time: shown, not fatal
                when = "?"
            print(f"{i.step:>10} {i.term:>6} {when:<20} {i.size:>12} {str(i.encrypted).lower():<9} "
                  f"{i.key_id or '-':<16} {provenance_summary(i.lineage, i.provenance)}"
                  f"{' attested' if i.attestation else ''}")
        return 0
    if cmd == "verify":
        return _print_verify(verify_report(args.uri, args.key, signing_key=args.signing_key,
                                           expect_step=args.expect_step), args.uri)
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


def _print_verify(report: VerifyReport, uri: str) -> int:
    """Print a verify report: one line per manifest, then the totals; 1 when anything failed or is missing."""
    if not report.results and report.expected_step is None:
        raise CheckpointError(f"no checkpoints under {uri}")
    unverifiable = set(report.unverifiable)
    for name, problem in report.results:
        status = "ok" if problem is None else ("UNVERIFIABLE: " if name in unverifiable else "DAMAGED: ") + problem
        print(f"{name}: {status}".splitlines()[0])
    print(f"{len(report.verified)} verified, {len(report.unverifiable)} unverifiable (left in place by retention)"
          f"{': ' + ', '.join(report.unverifiable) if report.unverifiable else ''}, {len(report.damaged)} damaged")
    if report.expected_step is not None:
        newest = "none verifies" if report.newest_step is None else f"step {report.newest_step}"
        gap = " (rolled back: newer checkpoints were deleted or replaced)" if report.rolled_back else ""
        print(f"newest verified: {newest}; expected: step {report.expected_step}{gap}")
    bad = [r for r in report.results if r[1] is not None]
    if bad:
        print(f"elastictrain ckpt verify: {len(bad)} of {len(report.results)} checkpoints fail: {bad[0][1]}"
              .splitlines()[0], file=sys.stderr)
    if report.rolled_back:
        print(f"elastictrain ckpt verify: the newest checkpoint that verifies is older than step "
              f"{report.expected_step}", file=sys.stderr)
    return 1 if bad or report.rolled_back else 0


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for name, reason in skipped:  # newer ones that did not verify: say why this one was taken
        print(f"elastictrain ckpt export: skipped {name}: {reason}".splitlines()[0], file=sys.stderr)


__all__ = ["add_ckpt_parser", "run_ckpt", "list_checkpoints", "verify_checkpoints", "verify_report", "VerifyReport", "export_checkpoint", "export_model"]
