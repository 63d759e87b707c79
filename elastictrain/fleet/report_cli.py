"""`elastictrain report URI [--events PATH] [--prices PRICES] [--out DIR] [--key SPEC]`: a run's report
from its event log and its checkpoints' manifests (`fleet.report`)."""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Union

from elastictrain.fleet.report import compute
from elastictrain.fleet.report_files import write
from elastictrain.fleet.report_log import read_events
from elastictrain.fleet.report_prices import Prices, load_prices


def list_manifests(uri: str, key: Optional[str] = None, signing_key: Optional[str] = None,
                   storage_options: Optional[dict] = None) -> list[dict]:
    """The checkpoints under `uri` with their provenance, oldest first; with a key (or a plaintext run's
    signing key), `verified` says whether each manifest's signature and identity check (else None)."""
    from elastictrain.checkpoint.catalog import describe_checkpoints, read_body
    from elastictrain.checkpoint.export import open_manager

    mgr = open_manager(uri, [key] if key else None, storage_options, signing_key)
    try:
        checked = {c.name: c.problem for c in mgr.check_manifests()} if (key or signing_key) else {}
        out = []
        for info in describe_checkpoints(mgr.storage):
            body = None if info.error else read_body(mgr.storage, info.name)
            out.append({
                "name": info.name, "step": info.step, "term": info.term, "time": info.time,
                "stored_bytes": info.stored_bytes, "encrypted": info.encrypted, "error": info.error,
                "provenance": dict(body.provenance) if body is not None else {},
                "lineage": body.lineage if body is not None else {},
                "verified": (checked.get(info.name, "not checked") is None) if checked else None,
            })
        return out
    finally:
        mgr.close()


def build_report(
    uri: Optional[str], events: Optional[str] = None, prices: Union[str, Prices, None] = None,
    storage_options: Optional[dict] = None, key: Optional[str] = None, signing_key: Optional[str] = None,
    allowed_regions: Optional[list[str]] = None,
) -> dict:
    """Read a run's event log (`events`, default `<uri>/events`) and manifests, and compute its report
    (`allowed_regions`: the jurisdiction policy whose crossings it flags).

    Raises:
        ValueError: neither a URI nor an event log is given.
        FileNotFoundError: the event log does not exist.
        BadPrices: the prices file is bad (names the line or key).
    """
    folder = events or (uri.rstrip("/") + "/events" if uri else None)
    if folder is None:
        raise ValueError("give a checkpoint URI or --events PATH: there is no event log to read")
    parsed = load_prices(prices) if isinstance(prices, str) else prices
    read = read_events(folder, storage_options)
    manifests = list_manifests(uri, key, signing_key, storage_options) if uri else []
    report = compute(read.events, manifests, parsed, allowed_regions)
    report["log"] = {"where": folder, "files": len(read.files), "events": len(read.events),
                     "skipped_lines": read.skipped_lines, "skipped_files": read.skipped_files,
                     "skip_reasons": read.reasons}
    return report


def add_report_parser(subparsers) -> None:
    """Register `report` on the top-level parser."""
    rep = subparsers.add_parser("report", help="a run's resume rate, goodput, GPU-hours and cost, with plots")
    rep.add_argument("uri", help="the run's checkpoint URI (its event log is under URI/events unless --events)")
    rep.add_argument("--events", default=None, metavar="PATH", help="the event log: a folder or one .jsonl file")
    rep.add_argument("--prices", default=None, help="a prices TOML file (see examples/prices.toml)")
    rep.add_argument("--out", default=None, metavar="DIR", help="write report.md, report.json and PNG plots here")
    rep.add_argument("--key", default=None, metavar="SPEC", help="key spec: verify the manifests' signatures")
    rep.add_argument("--signing-key", default=None, metavar="SPEC", help="a plaintext run's signing key spec")
    rep.add_argument("--allowed-regions", default=None, metavar="A,B",
                     help="the jurisdiction policy: flag workers and checkpoint uploads outside these regions")


def run_report(args: argparse.Namespace) -> int:
    """Run `report`: print the headline numbers; errors propagate (the caller prints one line)."""
    logging.getLogger("elastictrain.checkpoint").setLevel(logging.ERROR)
    allowed = [r for r in args.allowed_regions.split(",") if r] if args.allowed_regions else None
    report = build_report(args.uri, args.events, args.prices, key=args.key, signing_key=args.signing_key,
                          allowed_regions=allowed)
    if report["log"]["events"] == 0:
        raise ValueError(f"no readable events in {report['log']['where']}")
    if args.out:
        write(report, args.out)
    for name in ("steps_committed", "steps_redone", "goodput", "faults", "resume_rate", "gpu_hours_total",
                 "effective_gpu_hours", "cost_total", "cost_per_effective_gpu_hour"):
        print(f"{name}: {report[name]}")
    if report["policy_violated"]:
        print(f"policy_violations: {len(report['policy_violations'])} (see report.json)")
    log = report["log"]
    if log["skipped_lines"] or log["skipped_files"]:
        print(f"skipped {log['skipped_lines']} bad lines and {log['skipped_files']} files of the event log")
    if args.out:
        print(f"wrote {args.out}/report.md, report.json and plots")
    return 0
