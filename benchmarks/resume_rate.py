"""Resume-rate benchmark: a long run under a seeded schedule of mixed faults.

One run of the toy task on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`,
one CPU per node, nodes labelled provider/region, one spare node), with checkpoints
to a local file:// URI. Faults come one at a time, each once the run has recovered
from the previous one, in a seeded order that cycles through every kind:

- kill_follower / kill_leader: SIGKILL a follower / the leader;
- node_loss: a follower's whole node is removed; a node with the same labels is
  added back a few seconds later;
- preempt: SIGTERM a follower (a spot notice: save, leave cleanly);
- hang: SIGSTOP a follower (its heartbeat lapses; the driver kills it);
- kill_in_checkpoint: SIGKILL the leader right after a step whose commit starts
  a checkpoint save (`every_steps`);
- kill_in_rebuild: SIGKILL a follower, then another member ~30 ms later;
- silent_node: every process of a follower's node SIGSTOPped (`silence_node`): no connection
  closes, the node just stops answering, as a reclaimed VM does; it is removed `--silent-for`
  seconds later and a node with the same labels is added;
- notice: the cloud's preemption notice for a follower's node, switched on at that node's fake
  metadata server (AWS spot instance action, GCP `preempted`, Azure Scheduled Events `Preempt`);
  the node is reclaimed once the member has left, or when the warning (`--notice-warning`) runs out.

The nodes are labelled across three providers (aws, gcp, azure) and two regions of each (one in
the US, one in Europe); every node gets its own fake metadata server of its provider on 127.0.0.1
(`ELASTICTRAIN_METADATA_ENDPOINT` in the node's environment), and the elastictrain arm watches it
with the default `NoticeConfig` and runs with `NetworkConfig(private=True)` (the "providers" share
one machine's loopback).

Figures:

- resume rate: faults after which a later world committed a step, with no human
  action, over faults fired (and the run must finish);
- recovery time (median, p95): from the fault to the first step committed by
  the rebuilt world (rank 0's report time);
- steps redone: per fault and in total (`Result.steps_redone`);
- goodput: distinct steps x the undisturbed median step time, over the run's
  wall time;
- final model vs an uninterrupted one-process run (`reference_params`);
- by kind, also goodput over the windows after that kind's faults (new steps x the undisturbed
  step time / the window) and cost per effective GPU-hour: dollars per GPU-hour held over that
  goodput, with the dollars per GPU-hour held from `elastictrain.fleet.report.compute` over the
  elastictrain arm's event log and `examples/prices.toml` (the whole arm's figure is the
  report's own `cost_per_effective_gpu_hour`).

The Ray Train arm (optional; skipped with the reason when `ray[train]` is missing)
runs the same task and the same kinds of faults, where they apply, against
`TorchTrainer` with `FailureConfig(max_failures=-1)` and a checkpoint every
`--ckpt-every` steps, in a child process with a hard deadline. Ray Train reads no metadata
service: there a notice changes nothing until the warning runs out and the node is removed
(recovery is timed from that moment); a silent node is the same SIGSTOP of the node's processes.

    python -m benchmarks resume_rate                      # 50 faults, both arms
    python -m benchmarks resume_rate --quick              # ~6 faults, < 2 minutes
    python -m benchmarks resume_rate --faults 70 --arms elastictrain --out bench-out/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from benchmarks import _common as C

ARMS = ["elastictrain", "raytrain"]
QUICK = {"faults": 6, "arms": "elastictrain"}
QUICK_DEADLINE_S = 240
# Three providers, two regions each (the US and Europe); nodes take them in turn.
LABELS = [
    {"provider": "aws", "region": "us-east-1"},
    {"provider": "gcp", "region": "us-east1"},
    {"provider": "azure", "region": "eastus"},
    {"provider": "aws", "region": "eu-west-1"},
    {"provider": "gcp", "region": "europe-west4"},
    {"provider": "azure", "region": "westeurope"},
]
PRICES = Path(__file__).resolve().parent.parent / "examples" / "prices.toml"
GCP_WARNING_S = 30.0  # GCP's preemption warning is fixed; its metadata answer carries no time
# Faults per kind that apply to Ray Train's TorchTrainer and how they are injected there.
RAYTRAIN_KINDS = ["kill_follower", "kill_leader", "node_loss", "preempt", "hang", "kill_in_checkpoint",
                  "kill_in_rebuild", "silent_node", "notice"]


def fault_kinds(a: argparse.Namespace) -> tuple[str, ...]:
    """The kinds of `--kinds` (default: every kind of `FAULT_KINDS`)."""
    from elastictrain.testing.faults import FAULT_KINDS

    kinds = tuple(k for k in (a.kinds or "").split(",") if k) or FAULT_KINDS
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise SystemExit(f"resume_rate: unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    return kinds


def p95(values: list[float]) -> Optional[float]:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return vals[min(len(vals) - 1, math.ceil(0.95 * len(vals)) - 1)]


# ---------------------------------------------------------------------------
# Local multi-node cluster
# ---------------------------------------------------------------------------


class ClusterNodes:
    """A local multi-node Ray cluster whose nodes can be removed, silenced, sent a cloud notice, and given
    back (same labels). Each node has its own fake metadata server of its provider on 127.0.0.1."""

    def __init__(self, nodes: int, notice_warning_s: float = 30.0) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
            },
        )
        self.notice_warning_s = notice_warning_s
        self.labels: dict[str, dict] = {}
        self.servers: dict[str, Any] = {}
        self.removed: list[dict] = []
        try:
            for i in range(nodes):
                self._add(LABELS[i % len(LABELS)], wait=True)
        except BaseException:
            self.shutdown()
            raise

    def _add(self, labels: dict, wait: bool) -> None:
        from elastictrain.fleet.notice_watch import ENDPOINT_ENV
        from elastictrain.testing.metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGcpMetadata

        fake = {"aws": FakeAwsMetadata, "gcp": FakeGcpMetadata, "azure": FakeAzureMetadata}[labels["provider"]]()
        try:
            with _sigterm_handler_on_main_thread_only():
                node = self.cluster.add_node(wait=wait, num_cpus=1, labels=dict(labels),
                                             env_vars={ENDPOINT_ENV: fake.url})
        except BaseException:
            fake.close()
            raise
        self.labels[node.node_id] = dict(labels)
        self.servers[node.node_id] = fake

    def _node(self, node_id: str):
        return next(n for n in self.cluster.list_all_nodes() if n.node_id == node_id)

    def remove(self, node_id: str) -> None:
        node = self._node(node_id)
        if node is self.cluster.head_node:
            raise ValueError("will not remove the head node")
        self.removed.append(self.labels.get(node_id, LABELS[0]))
        from elastictrain.testing.faults import kill_node

        kill_node(self.cluster, node)  # a silenced node's stopped processes too
        fake = self.servers.pop(node_id, None)
        if fake is not None:
            fake.close()

    def silence(self, node_id: str) -> list[int]:
        """Every process of the node SIGSTOPped; `remove` ends them later."""
        from elastictrain.testing.faults import silence_node

        return silence_node(self._node(node_id))

    def notice(self, node_id: str) -> float:
        """The node's cloud says it reclaims the machine; returns the warning's length (seconds)."""
        fake, provider = self.servers[node_id], self.labels[node_id]["provider"]
        if provider == "aws":
            fake.interrupt("terminate", in_s=self.notice_warning_s)
            return self.notice_warning_s
        if provider == "gcp":
            fake.preempt()
            return GCP_WARNING_S
        fake.schedule("Preempt", in_s=self.notice_warning_s)
        return self.notice_warning_s

    def protected(self) -> set[str]:
        """Nodes not to remove: the one holding the run's Hub actor.

        ElasticTrainer places its driver-side Hub actor (num_cpus=0) on any node and the
        run fails when that node dies; on a real cluster it would sit on the head node.
        """
        try:
            from ray.util.state import list_actors

            return {a.node_id for a in list_actors(filters=[("class_name", "=", "Hub"), ("state", "=", "ALIVE")])}
        except Exception:  # noqa: BLE001 - no state API: protect nothing
            return set()

    def add(self) -> None:
        """Capacity comes back: a node with the labels of the oldest removed one (returns at once)."""
        self._add(self.removed.pop(0) if self.removed else LABELS[0], wait=False)

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            for fake in self.servers.values():
                fake.close()
            self.servers.clear()


@contextlib.contextmanager
def _sigterm_handler_on_main_thread_only():
    """Ray installs a SIGTERM handler for each node it starts, which Python allows on the main thread
    only; the Ray Train arm adds nodes from its injector thread, where the handler is skipped (the
    cluster's shutdown still ends every node)."""
    import ray._private.utils as ray_utils

    saved = ray_utils.set_sigterm_handler
    if threading.current_thread() is not threading.main_thread():
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = saved


# ---------------------------------------------------------------------------
# Figures shared by the arms
# ---------------------------------------------------------------------------


def undisturbed_step_s(times_by_step: list[tuple[int, float]], fault_times: list[float], margin_s: float = 2.0) -> Optional[float]:
    """Median interval between consecutive committed steps, away from any fault."""
    gaps = []
    for (s0, t0), (s1, t1) in zip(times_by_step, times_by_step[1:]):
        if s1 != s0 + 1:
            continue
        if any(t0 - margin_s <= f <= t1 + margin_s for f in fault_times):
            continue
        gaps.append(t1 - t0)
    return C.median(gaps)


def goodput_by_kind(rows: list[dict], first_commits: dict[int, float], end: float,
                    step_s: Optional[float]) -> dict[str, Optional[float]]:
    """Per kind: steps first committed in the windows that follow its faults (each fault to the next, the
    last to `end`) x the undisturbed step time, over those windows' length."""
    if not step_s:
        return {}
    times = sorted(r["time"] for r in rows if r["time"] is not None)
    spans: dict[str, list[float]] = {}
    for r in rows:
        if r["time"] is None:
            continue
        nxt = next((t for t in times if t > r["time"]), end)
        new = sum(1 for t in first_commits.values() if r["time"] <= t < nxt)
        acc = spans.setdefault(r["kind"], [0.0, 0.0])
        acc[0] += new * step_s
        acc[1] += max(nxt - r["time"], 0.0)
    return {k: (useful / span if span > 0 else None) for k, (useful, span) in spans.items()}


def summarise(rows: list[dict], *, scheduled: int, total_steps: int, steps_done: int, finished: bool,
              wall_s: float, step_s: Optional[float], param_diff: Optional[float], steps_redone_total: int,
              first_commits: Optional[dict[int, float]] = None, end: Optional[float] = None,
              held_rate: Optional[float] = None) -> dict:
    """The arm's figures, whole and by kind. `held_rate`: dollars per GPU-hour held; a kind's cost per
    effective GPU-hour is that rate over the kind's goodput (`goodput_by_kind`)."""
    fired = len(rows)
    resumed = sum(1 for r in rows if r["resumed"]) if finished else 0
    times = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
    by_kind: dict[str, dict] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"fired": 0, "resumed": 0, "recovery_s": [], "steps_redone": 0})
        k["fired"] += 1
        k["resumed"] += int(bool(r["resumed"]) and finished)
        if r["recovery_s"] is not None:
            k["recovery_s"].append(r["recovery_s"])
        k["steps_redone"] += r["steps_redone"] or 0
    kind_goodput = goodput_by_kind(rows, first_commits or {}, end if end is not None else math.inf, step_s) \
        if first_commits and end is not None else {}
    for name, k in by_kind.items():
        vals = k.pop("recovery_s")
        k["resume_rate"] = k["resumed"] / k["fired"] if k["fired"] else None
        k["recovery_median_s"] = C.median(vals)
        k["recovery_p95_s"] = p95(vals)
        k["recovery_max_s"] = max(vals) if vals else None
        k["goodput"] = kind_goodput.get(name)
        k["cost_per_effective_gpu_hour"] = (held_rate / k["goodput"]) if (held_rate and k["goodput"]) else None
    redone = [r["steps_redone"] for r in rows if r["steps_redone"] is not None]
    return {
        "faults_scheduled": scheduled,
        "faults_fired": fired,
        "faults_resumed": resumed,
        "resume_rate": resumed / fired if fired else None,
        "finished": finished,
        "steps": steps_done,
        "total_steps": total_steps,
        "recovery_median_s": C.median(times),
        "recovery_p95_s": p95(times),
        "recovery_max_s": max(times) if times else None,
        "steps_redone_total": steps_redone_total,
        "steps_redone_max_per_fault": max(redone) if redone else None,
        "steps_redone_per_fault": (steps_redone_total / fired) if fired else None,
        "undisturbed_step_s": step_s,
        "wall_s": wall_s,
        "goodput": (total_steps * step_s / wall_s) if (step_s and wall_s and finished) else None,
        "usd_per_gpu_hour_held": held_rate,
        "cost_per_effective_gpu_hour": (held_rate * wall_s / (total_steps * step_s))
        if (held_rate and step_s and wall_s and finished) else None,
        "max_param_diff_vs_reference": param_diff,
        "by_kind": by_kind,
    }


# ---------------------------------------------------------------------------
# elastictrain arm (in this process: Ray's add_node must run on the main thread)
# ---------------------------------------------------------------------------


def run_elastictrain(a: argparse.Namespace, work: Path) -> dict:
    import ray
    import torch

    import elastictrain as et
    from elastictrain.testing.faults import ChaosSchedule, chaos_report
    from elastictrain.testing.toy import ToyTask, make_train_fn, reference_params

    task = ToyTask(total_steps=a.steps, step_sleep_s=a.step_sleep, seed=a.seed)
    batch = et.BatchConfig(global_batch_size=a.global_batch, micro_batch_size=a.micro_batch, seed=a.seed)
    nodes = ClusterNodes(a.workers + 1, notice_warning_s=a.notice_warning)
    schedule = ChaosSchedule.mixed(
        count=a.faults, seed=a.seed, full_world=a.workers, gap_steps=a.gap_steps, checkpoint_every=a.ckpt_every,
        node_ops=nodes, readd_after_s=a.readd_after, full_world_wait_s=a.full_world_wait,
        silent_for_s=a.silent_for, kinds=fault_kinds(a),
    )
    print(f"[elastictrain] {a.workers} workers, {a.steps} steps, {a.faults} faults: "
          f"{', '.join(f.kind for f in schedule.faults)}", flush=True)
    uri = (work / "ckpt").as_uri()
    events_dir = work / "events"
    began = time.time()
    result, error = None, None
    try:
        ray.init(address=nodes.cluster.address, logging_level="ERROR", log_to_driver=False)
        result = et.ElasticTrainer(
            make_train_fn(task),
            scaling=et.ScalingConfig(min_workers=1, max_workers=a.workers),
            batch=batch,
            checkpoint=et.CheckpointConfig(uri=uri, every_steps=a.ckpt_every, keep_last=2),
            failure=et.FailureConfig(max_failures=-1, collective_timeout_s=4, heartbeat_interval_s=0.2,
                                     heartbeat_timeout_s=1.5, startup_wait_s=2.0),
            run=et.RunConfig(progress=True, seed=a.seed, events_path=str(events_dir)),
            # the "providers" are nodes of one machine, talking over its loopback
            network=et.NetworkConfig(private=True),
            callbacks=[schedule],
        ).fit()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: a failed run is a finding
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        wall = time.time() - began
        ray.shutdown()
        nodes.shutdown()
    if result is None:
        rows = [{"kind": f.kind, "step": f.fired_step, "time": f.fired_at, "resumed": False, "recovery_s": None,
                 "steps_redone": None} for f in schedule.fired]
        summary = summarise(rows, scheduled=a.faults, total_steps=a.steps, steps_done=-1, finished=False,
                            wall_s=wall, step_s=None, param_diff=None, steps_redone_total=0)
        return {"summary": summary, "faults": rows, "error": error, "timeline": {}}
    rows = chaos_report(schedule, result)
    hist = [h for h in result.history if "step" in h and "time" in h and "loss" in h]
    firsts: dict[int, float] = {}
    for h in hist:
        firsts.setdefault(h["step"], h["time"])
    step_s = undisturbed_step_s(sorted(firsts.items()), [r["time"] for r in rows])
    diff = None
    if "params" in result.metrics:
        ref = reference_params(task, batch)
        diff = (torch.tensor(result.metrics["params"]) - ref).abs().max().item()
    fleet = fleet_report(events_dir)
    summary = summarise(rows, scheduled=a.faults, total_steps=a.steps, steps_done=result.steps,
                        finished=result.steps == a.steps, wall_s=wall, step_s=step_s, param_diff=diff,
                        steps_redone_total=result.steps_redone, first_commits=firsts, end=began + wall,
                        held_rate=fleet.get("usd_per_gpu_hour_held"))
    summary["report"] = fleet
    summary["notices"] = notice_facts(result.events)
    summary["targets"] = targets(summary, heartbeat_timeout_s=1.5)
    summary["workers_lost"] = result.failures
    summary["checkpoint_fallbacks"] = sum(1 for e in result.events if e["kind"] == "restored_from_checkpoint")
    summary["nodes_readded"] = len(schedule.readds)
    timeline = {
        "t0": began,
        "steps": [[h["time"] - began, h["step"]] for h in hist],
        "world": [[e["time"] - began, e["world_size"]] for e in result.events if e["kind"] == "world"],
        "faults": [[r["time"] - began, r["kind"]] for r in rows],
    }
    return {"summary": summary, "faults": rows, "error": error, "timeline": timeline}


def fleet_report(events_dir: Path) -> dict:
    """`elastictrain.fleet.report.compute` over the arm's event log with `examples/prices.toml`: the
    figures of `elastictrain report`, and the dollars per GPU-hour held that price each kind."""
    from elastictrain.fleet.report import compute
    from elastictrain.fleet.report_log import read_events
    from elastictrain.fleet.report_prices import load_prices

    try:
        rep = compute(read_events(str(events_dir)).events, prices=load_prices(str(PRICES)))
    except Exception as exc:  # noqa: BLE001 - reported: the run's other figures stand without it
        return {"error": f"{type(exc).__name__}: {exc}"}
    keep = ("resume_rate", "faults", "faults_resumed", "recovery_s_median", "goodput", "steps_redone",
            "gpu_hours", "gpu_hours_total", "effective_gpu_hours", "cost_total", "cost_per_effective_gpu_hour",
            "largest_provider_share", "steps_by_provider", "currency")
    out = {k: rep.get(k) for k in keep}
    held = rep.get("gpu_hours_total")
    out["usd_per_gpu_hour_held"] = (rep["cost_total"] / held) if (rep.get("cost_total") and held) else None
    return out


def notice_facts(events: list[dict]) -> dict:
    """What the workers made of the notices: `cloud_notice` events by provider, and each clean leave on
    one (`left` with a cloud `source`): the warning's length and how much of it was used."""
    seen: dict[str, int] = {}
    for e in events:
        if e["kind"] == "cloud_notice":
            seen[e.get("provider", "?")] = seen.get(e.get("provider", "?"), 0) + 1
    left = [e for e in events if e["kind"] == "left" and e.get("source") in ("aws", "gcp", "azure")]
    return {"cloud_notices": seen, "left_on_notice": len(left),
            "used_s": [round(e["used_s"], 2) for e in left if isinstance(e.get("used_s"), (int, float))],
            "notice_s": [round(e["notice_s"], 1) for e in left if isinstance(e.get("notice_s"), (int, float))]}


def targets(summary: dict, heartbeat_timeout_s: float) -> dict:
    """The issue's targets, reported (not asserted): every fault resumed, no step redone after a notice,
    silent-node recovery (median) at most the heartbeat timeout + 0.5 s."""
    kinds = summary["by_kind"]
    notice, silent = kinds.get("notice"), kinds.get("silent_node")
    bound = heartbeat_timeout_s + 0.5
    silent_median = silent["recovery_median_s"] if silent else None
    return {
        "all_resumed": summary["resume_rate"] == 1.0,
        "notice_steps_redone": notice["steps_redone"] if notice else None,
        "notice_lost_no_step": (notice["steps_redone"] == 0) if notice else None,
        "silent_node_median_s": silent_median,
        "silent_node_bound_s": bound,
        "silent_node_within_bound": (silent_median <= bound) if silent_median is not None else None,
    }


# ---------------------------------------------------------------------------
# Ray Train arm (child process)
# ---------------------------------------------------------------------------


def trial_raytrain(a: argparse.Namespace, d: Path) -> None:
    """TorchTrainer on the toy task; an injector thread applies the same kinds of faults to its workers."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer

    from elastictrain.config import BatchConfig
    from elastictrain.testing.faults import ChaosSchedule
    from elastictrain.testing.toy import ToyTask, reference_params

    task = ToyTask(total_steps=a.steps, step_sleep_s=a.step_sleep, seed=a.seed)
    batch = BatchConfig(global_batch_size=a.global_batch, micro_batch_size=a.micro_batch, seed=a.seed)
    kinds = [f.kind for f in ChaosSchedule.mixed(count=a.faults, seed=a.seed, full_world=a.workers, kinds=fault_kinds(a),
                                                  checkpoint_every=a.ckpt_every, node_ops=_NoNodes()).faults]
    nodes = ClusterNodes(a.workers + 1, notice_warning_s=a.notice_warning)
    log_dir = d / "steps"
    cfg = {"log_dir": str(log_dir), "ckpt_tmp": str(d / "ckpt-tmp"), "task": task.__dict__, "batch": batch.model_dump(),
           "ckpt_every": a.ckpt_every}

    def train_loop(config: dict) -> None:
        import tempfile as _tf

        import ray.train as rt
        import ray.train.torch as rtt
        import torch as _t

        from benchmarks import _common as CC
        from elastictrain.accumulate import GradAccumulator, micro_batches, plan_rank
        from elastictrain.config import BatchConfig as BC
        from elastictrain.testing.toy import ToyDataset, ToyTask as TT, flat_params, loss_sum, make_model

        CC.set_threads(1)
        t = TT(**config["task"])
        b = BC(**config["batch"])
        ctx = rt.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        log = CC.StepLog(config["log_dir"], rank)
        data = ToyDataset(t)
        model = rtt.prepare_model(make_model(t))
        opt = _t.optim.AdamW(model.parameters(), lr=t.lr)
        start = 0
        ckpt = rt.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as cd:
                state = _t.load(os.path.join(cd, "state.pt"), weights_only=True)
            getattr(model, "module", model).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["next_step"])
        acc = GradAccumulator(model, opt)
        k = plan_rank(b.global_batch_size, b.micro_batch_size, world, rank).num_micro_batches
        for step in range(start, t.total_steps):
            with acc.step(num_micro_batches=k) as s:
                for mb in micro_batches(data, step, rank=rank, world_size=world, batch=b):
                    total, n = loss_sum(model, mb)
                    s.backward(total, num_items=n)
            time.sleep(t.step_sleep_s)
            log.step(step, world=world)
            last = step + 1 == t.total_steps
            if (step + 1) % config["ckpt_every"] == 0 or last:
                metrics = {"step": step}
                if last:
                    metrics["params"] = flat_params(model).tolist()
                if rank == 0:
                    os.makedirs(config["ckpt_tmp"], exist_ok=True)
                    with _tf.TemporaryDirectory(dir=config["ckpt_tmp"]) as td:
                        _t.save({"model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict(),
                                 "next_step": step + 1}, os.path.join(td, "state.pt"))
                        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(td))
                else:
                    rt.report(metrics)
        log.close()

    injector = _RayTrainInjector(kinds, log_dir, nodes, a)
    began = time.time()
    status: dict[str, Any] = {"ok": False}
    try:
        ray.init(address=nodes.cluster.address, logging_level="ERROR", log_to_driver=False)
        injector.start()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend="gloo", timeout_s=10),
            scaling_config=ray.train.ScalingConfig(num_workers=a.workers, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name="resume-rate", storage_path=str(d / "storage"),
                failure_config=ray.train.FailureConfig(max_failures=-1),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        res = trainer.fit()
        status["ok"] = res.error is None
        status["error"] = None if res.error is None else f"{type(res.error).__name__}: {res.error}"
        params = (res.metrics or {}).get("params")
        if params is not None:
            ref = reference_params(task, batch)
            status["max_param_diff_vs_reference"] = (torch.tensor(params) - ref).abs().max().item()
    except Exception as exc:  # noqa: BLE001
        status["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        injector.stop()
        status["wall_s"] = time.time() - began
        status["t0"] = began
        status["faults"] = injector.fired
        status["skipped_kinds"] = injector.skipped
        (d / "status.json").write_text(json.dumps(status, default=str))
        ray.shutdown()
        nodes.shutdown()


class _NoNodes:
    """Node operations that do nothing: enough to build the schedule whose kinds the Ray Train arm replays."""

    def remove(self, node_id: str) -> None: ...

    def add(self) -> None: ...

    def silence(self, node_id: str) -> list[int]:
        return []

    def notice(self, node_id: str) -> Optional[float]:
        return None


class _RayTrainInjector(threading.Thread):
    """Reads the workers' step logs and fires one fault at a time on their processes.

    Ranks come from the newest records; a fault waits until every rank of the
    current attempt has logged `gap_steps` steps past the previous fault.
    """

    def __init__(self, kinds: list[str], log_dir: Path, nodes: ClusterNodes, a: argparse.Namespace) -> None:
        super().__init__(name="raytrain-injector", daemon=True)
        self.kinds, self.log_dir, self.nodes, self.a = list(kinds), log_dir, nodes, a
        self.fired: list[dict] = []
        self.skipped: dict[str, str] = {}
        self.restart_wait_s = 90.0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _current(self) -> tuple[dict[int, dict], int]:
        recs = C.read_step_logs(self.log_dir) if self.log_dir.exists() else []
        newest: dict[int, dict] = {}
        for r in recs:
            newest[r["rank"]] = r
        last_fault = self.fired[-1]["time"] if self.fired else 0.0
        # Every fault restarts Ray Train's whole worker group: wait for processes started after it
        # (or, should none come, for any progress after `restart_wait_s`).
        old = {r["pid"] for r in recs if r["t"] <= last_fault} if self.fired else set()
        patient = time.time() - last_fault > self.restart_wait_s
        live = {rk: r for rk, r in newest.items() if r["t"] > last_fault and (patient or r["pid"] not in old)}
        return live, max((r["step"] for r in recs), default=-1)

    def _node_of(self, pid: int) -> Optional[str]:
        for node in self.nodes.cluster.list_all_nodes():
            if node is self.nodes.cluster.head_node:
                continue
            try:
                import psutil

                raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
                if pid in {c.pid for c in raylet.children(recursive=True)}:
                    return node.node_id
            except Exception:  # noqa: BLE001
                continue
        return None

    def _node_back(self, due: list[tuple[float, Optional[str]]]) -> None:
        """Due node changes: a silenced node removed (if any), then a node with its labels added."""
        while due and time.time() >= due[0][0]:
            _, silenced = due.pop(0)
            try:
                if silenced is not None:
                    self.nodes.remove(silenced)
                self.nodes.add()
            except Exception as exc:  # noqa: BLE001 - reported with the arm
                self.skipped["node re-add"] = f"{type(exc).__name__}: {exc}"

    def run(self) -> None:
        steps_at_fire = 0
        readd_at: list[tuple[float, Optional[str]]] = []
        while not self._halt.wait(0.05):
            self._node_back(readd_at)
            if not self.kinds:
                continue
            live, newest = self._current()
            if len(live) < self.a.workers:
                continue
            if min(r["step"] for r in live.values()) < steps_at_fire + self.a.gap_steps:
                continue
            newest = max(r["step"] for r in live.values())
            kind = self.kinds[0]
            if kind == "kill_in_checkpoint" and (newest + 1) % self.a.ckpt_every != 0:
                continue
            self.kinds.pop(0)
            leader, follower = live[0]["pid"], live[1 if len(live) > 1 else 0]["pid"]
            t = time.time()
            entry = {"kind": kind, "time": t, "step": newest}
            try:
                if kind in ("kill_leader", "kill_in_checkpoint"):
                    os.kill(leader, signal.SIGKILL)
                elif kind == "kill_follower":
                    os.kill(follower, signal.SIGKILL)
                elif kind == "preempt":
                    os.kill(follower, signal.SIGTERM)
                elif kind == "hang":
                    os.kill(follower, signal.SIGSTOP)
                elif kind == "kill_in_rebuild":
                    os.kill(follower, signal.SIGKILL)
                    time.sleep(self.a.rebuild_delay)
                    os.kill(leader, signal.SIGKILL)
                elif kind in ("node_loss", "silent_node", "notice"):
                    node_id = self._node_of(follower)
                    entry["node_id"] = node_id
                    if node_id is None:
                        os.kill(follower, signal.SIGKILL)
                        entry["note"] = "node not found; worker killed instead"
                    elif kind == "node_loss":
                        self.nodes.remove(node_id)
                        readd_at.append((t + self.a.readd_after, None))
                    elif kind == "silent_node":
                        entry["stopped"] = len(self.nodes.silence(node_id))
                        readd_at.append((t + max(self.a.readd_after, self.a.silent_for), node_id))
                    else:
                        # Ray Train reads no metadata service: the notice changes nothing until the warning
                        # runs out and the machine goes. The fault is timed from then.
                        entry["notice_at"] = t
                        entry["warning_s"] = self.nodes.notice(node_id)
                        if self._halt.wait(entry["warning_s"]):
                            break
                        self.nodes.remove(node_id)
                        entry["time"] = time.time()
                        entry["step"] = newest = self._current()[1]  # the next fault counts its steps from here
                        readd_at.append((entry["time"] + self.a.readd_after, None))
                    readd_at.sort(key=lambda item: item[0])
            except ProcessLookupError:
                entry["note"] = "target already gone"
            self.fired.append(entry)
            steps_at_fire = newest


def run_raytrain(a: argparse.Namespace, work: Path) -> dict:
    try:
        import ray.train.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"ray[train] is not available: {type(exc).__name__}: {exc}"}
    d = work / "raytrain"
    d.mkdir(parents=True, exist_ok=True)
    fwd = _forward_args(a)
    fwd[fwd.index("--faults") + 1] = str(a.raytrain_faults)
    fwd[fwd.index("--steps") + 1] = str(a.raytrain_steps)
    cmd = [sys.executable, "-m", "benchmarks.resume_rate", "--trial", "raytrain", "--trial-dir", str(d), *fwd]
    # Ray Train notices a hung worker when its health check times out: 600 s by default; the
    # arm uses --raytrain-health-timeout (10 s, near elastictrain's heartbeat + collective timeouts).
    env = C.child_env({"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": a.raytrain_health_timeout})
    run = C.run_child(cmd, a.raytrain_timeout, d / "output.log", env=env)
    status = json.loads((d / "status.json").read_text()) if (d / "status.json").exists() else {}
    recs = C.read_step_logs(d / "steps") if (d / "steps").exists() else []
    rows = []
    faults = status.get("faults", [])
    for i, f in enumerate(faults):
        nxt = faults[i + 1]["time"] if i + 1 < len(faults) else float("inf")
        before = {r["step"] for r in recs if r["t"] <= f["time"]}
        after = [r for r in recs if f["time"] < r["t"] <= nxt]
        # new progress after the fault: a step logged after it by a process that started after it
        pids_before = {r["pid"] for r in recs if r["t"] <= f["time"]}
        fresh = [r for r in after if r["pid"] not in pids_before]
        first = fresh[0] if fresh else None
        redone = {r["step"] for r in fresh if r["step"] in before}
        rows.append({"kind": f["kind"], "step": f["step"], "time": f["time"], "resumed": first is not None,
                     "recovery_s": (first["t"] - f["time"]) if first else None, "steps_redone": len(redone),
                     **{k: f[k] for k in ("note", "notice_at", "warning_s", "stopped") if k in f}})
    done = {r["step"] for r in recs}
    finished = bool(status.get("ok")) and all(s in done for s in range(a.raytrain_steps))
    firsts: dict[int, float] = {}
    for r in recs:
        if r["rank"] == 0:
            firsts.setdefault(r["step"], r["t"])
    step_s = undisturbed_step_s(sorted(firsts.items()), [f["time"] for f in faults])
    wall = status.get("wall_s") or run["wall_s"]
    t0 = status.get("t0", recs[0]["t"] if recs else 0.0)
    summary = summarise(rows, scheduled=a.raytrain_faults, total_steps=a.raytrain_steps,
                        steps_done=max(done) + 1 if done else -1, finished=finished, wall_s=wall, step_s=step_s,
                        param_diff=status.get("max_param_diff_vs_reference"),
                        steps_redone_total=sum(r["steps_redone"] for r in rows), first_commits=firsts,
                        end=t0 + wall, held_rate=listed_rate(a.workers))
    worlds = []
    for r in recs:
        if r["rank"] == 0 and (not worlds or worlds[-1][1] != r.get("world")):
            worlds.append([r["t"] - t0, r.get("world")])
    timeline = {"steps": [[t - t0, s] for s, t in sorted(firsts.items())],
                "faults": [[f["time"] - t0, f["kind"]] for f in faults], "world": worlds}
    out = {"summary": summary, "faults": rows, "error": status.get("error"), "timeline": timeline,
           "timed_out": run["timed_out"], "rc": run["rc"], "skipped_kinds": status.get("skipped_kinds", {})}
    if run["timed_out"] or not status:
        out["log_tail"] = C.tail(d / "output.log", 3000)
    return out


def listed_rate(workers: int) -> Optional[float]:
    """Dollars per worker-hour of the first `workers` nodes' providers (their default hourly price in
    `examples/prices.toml`: the nodes carry no instance type), averaged; each worker counts as one GPU,
    as `elastictrain report` counts a CPU worker. The Ray Train arm, which writes no event log, is
    priced with it."""
    from elastictrain.fleet.report_prices import load_prices

    try:
        prices = load_prices(str(PRICES))
    except Exception:  # noqa: BLE001 - no prices: no dollars
        return None
    rates = [prices.providers[LABELS[i % len(LABELS)]["provider"]].default_hourly
             for i in range(workers) if LABELS[i % len(LABELS)]["provider"] in prices.providers]
    rates = [r for r in rates if r is not None]
    return sum(rates) / len(rates) if len(rates) == workers and rates else None


def _forward_args(a: argparse.Namespace) -> list[str]:
    return ["--faults", str(a.faults), "--steps", str(a.steps), "--workers", str(a.workers), "--seed", str(a.seed),
            "--step-sleep", str(a.step_sleep), "--ckpt-every", str(a.ckpt_every), "--gap-steps", str(a.gap_steps),
            "--readd-after", str(a.readd_after), "--global-batch", str(a.global_batch),
            "--micro-batch", str(a.micro_batch), "--silent-for", str(a.silent_for),
            "--notice-warning", str(a.notice_warning), "--kinds", a.kinds]


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def markdown(report: dict) -> str:
    a = report["config"]
    lines = [f"# Resume rate under mixed faults\n",
             f"`{report['command']}`\n",
             f"{a['workers']} workers (one CPU node each, one spare node; nodes across aws, gcp and azure, two regions "
             f"each), {a['steps']} steps, {a['faults']} faults scheduled (seed {a['seed']}), checkpoint every "
             f"{a['ckpt_every']} steps to file://. Machine: {report['machine']['cpus']} CPUs, load "
             f"{report['machine']['loadavg_1_5_15']}.\n"]
    rows = []
    for arm, res in report["arms"].items():
        if "skipped" in res:
            rows.append([arm, f"skipped: {res['skipped']}"] + [""] * 8)
            continue
        s = res["summary"]
        rate = f"{s['faults_resumed']}/{s['faults_fired']}" + (f" ({100 * s['resume_rate']:.0f}%)" if s["resume_rate"] is not None else "")
        rate += f"; {s['faults_fired']} of {s['faults_scheduled']} fired"
        diff = s["max_param_diff_vs_reference"]
        rows.append([arm, rate, C.fmt(s["recovery_median_s"], 2, " s"), C.fmt(s["recovery_p95_s"], 2, " s"),
                     f"{s['steps_redone_total']} (max {s['steps_redone_max_per_fault']}/fault)",
                     C.fmt(s["goodput"] * 100 if s["goodput"] is not None else None, 0, "%"),
                     _dollars(s.get("cost_per_effective_gpu_hour")),
                     f"{s['steps']}/{s['total_steps']}", C.fmt(diff, 1) if diff is None else f"{diff:.1e}",
                     C.fmt(s["wall_s"], 0, " s")])
    lines.append(C.md_table(["arm", "resumed", "recovery median", "recovery p95", "steps redone", "goodput",
                             "$/effective GPU-h", "steps", "max |param diff| vs reference", "wall"], rows))
    for arm, res in report["arms"].items():
        if "skipped" in res:
            continue
        s = res["summary"]
        lines.append(f"\n## {arm}: by fault kind\n")
        krows = [[k, f"{v['resumed']}/{v['fired']}", C.fmt(v["recovery_median_s"], 2, " s"),
                  C.fmt(v.get("recovery_p95_s"), 2, " s"), v["steps_redone"],
                  C.fmt(v["goodput"] * 100 if v.get("goodput") is not None else None, 0, "%"),
                  _dollars(v.get("cost_per_effective_gpu_hour"))]
                 for k, v in sorted(s["by_kind"].items())]
        lines.append(C.md_table(["kind", "resumed", "recovery median", "recovery p95", "steps redone",
                                 "goodput after", "$/effective GPU-h"], krows))
        fleet = s.get("report")
        if fleet and "error" not in fleet:
            lines.append(f"\n`elastictrain report` over the arm's event log with examples/prices.toml: resume rate "
                         f"{C.fmt(fleet['resume_rate'], 3)}, goodput {C.fmt(fleet['goodput'], 3)}, "
                         f"{C.fmt(fleet['gpu_hours_total'], 4)} GPU-hours held, {C.fmt(fleet['effective_gpu_hours'], 4)} "
                         f"effective, cost {_dollars(fleet['cost_total'])}, {_dollars(fleet['cost_per_effective_gpu_hour'])}"
                         f" per effective GPU-hour, largest provider share {C.fmt(fleet['largest_provider_share'], 2)}.\n")
        elif fleet:
            lines.append(f"\nNo report from the event log: `{fleet['error']}`\n")
        if s.get("notices"):
            n = s["notices"]
            lines.append(f"\nNotices seen by the workers: {n['cloud_notices']}; clean leaves on a notice: "
                         f"{n['left_on_notice']} (warning used, s: {n['used_s']} of {n['notice_s']}).\n")
        if s.get("targets"):
            t = s["targets"]
            lines.append(f"\nTargets (reported): all resumed: {t['all_resumed']}; a notice loses no step: "
                         f"{t['notice_lost_no_step']} ({t['notice_steps_redone']} redone); silent-node recovery median "
                         f"{C.fmt(t['silent_node_median_s'], 2, ' s')} <= {t['silent_node_bound_s']} s: "
                         f"{t['silent_node_within_bound']}.\n")
        if res.get("error"):
            lines.append(f"\nError: `{res['error']}`\n")
        if res.get("skipped_kinds"):
            lines.append(f"\nNot applied: {res['skipped_kinds']}\n")
    if report.get("plot"):
        lines.append(f"\n![steps and world size over time]({Path(report['plot']).name})\n")
    lines.append("\nResumed: a later world committed a step after the fault, with no human action, and the run "
                 "finished. Recovery: fault to the first step committed after it by the rebuilt world (Ray Train: "
                 "by a restarted worker; a notice there is timed from the node's removal when the warning ran out). "
                 "Goodput: steps x undisturbed median step time / wall time; by kind, over the windows after that "
                 "kind's faults. $/effective GPU-h: dollars per GPU-hour held (elastictrain: from its report; Ray "
                 "Train: the workers' providers' listed hourly price) / goodput.\n")
    return "\n".join(lines)


def _dollars(value: Optional[float]) -> str:
    return "n/a" if value is None else f"${value:.2f}"


def plot(report: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}", file=sys.stderr)
        return None
    arms = [(arm, res) for arm, res in report["arms"].items() if res.get("timeline", {}).get("steps")]
    if not arms:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = {"elastictrain": "tab:blue", "raytrain": "tab:orange"}
    markers = {"kill_follower": "x", "kill_leader": "X", "node_loss": "s", "preempt": "v", "hang": "P",
               "kill_in_checkpoint": "D", "kill_in_rebuild": "*", "silent_node": "p", "notice": "^"}
    for arm, res in arms:
        tl = res["timeline"]
        color = colors.get(arm, None)
        xs, ys = zip(*tl["steps"])
        axes[0].plot(xs, ys, ".", ms=2, color=color, label=f"{arm}: committed step")
        for t, kind in tl.get("faults", []):
            axes[0].axvline(t, color=color, alpha=0.12, lw=0.8)
            axes[0].plot([t], [0], markers.get(kind, "o"), color=color, ms=6)
        if tl.get("world"):
            wx, wy = zip(*[(t, w) for t, w in tl["world"] if w is not None] or [(0, 0)])
            end = max(xs)
            axes[1].step(list(wx) + [end], list(wy) + [wy[-1]], where="post", color=color, label=arm)
    for kind, m in markers.items():
        axes[0].plot([], [], m, color="gray", label=kind)
    axes[0].set_ylabel("step")
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    axes[0].set_title("Training progress under mixed faults (markers at the bottom: faults)")
    axes[1].set_ylabel("world size")
    axes[1].set_xlabel("wall time (s)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def build_parser() -> C.BenchmarkParser:
    p = C.BenchmarkParser(
        "resume_rate", __doc__, repeats=1, quick=QUICK,
        no_effect={"repeats": "one long run; its faults are the samples"},
        help={"seed": "seed of the fault order, the model and the data (default: 0)",
              "timeout": "deadline of the whole benchmark in seconds (default: none; the Ray Train arm's own "
                         "deadline is --raytrain-timeout)"},
    )
    p.add_argument("--faults", type=int, default=50, help="faults to inject (default 50)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100 per fault + 50)")
    C.add_workers_arg(p, 3)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--step-sleep", type=float, default=0.05, help="seconds slept in each step")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--gap-steps", type=int, default=3, help="steps committed after a recovery before the next fault")
    p.add_argument("--readd-after", type=float, default=3.0, help="seconds before a lost node's capacity returns")
    p.add_argument("--full-world-wait", type=float, default=6.0,
                   help="seconds a fault waits for the full world before firing on fewer members")
    p.add_argument("--rebuild-delay", type=float, default=0.03, help="seconds between the two kills of kill_in_rebuild")
    p.add_argument("--kinds", default="", help="comma-separated fault kinds to cycle through (default: all of "
                   "elastictrain.testing.faults.FAULT_KINDS)")
    p.add_argument("--silent-for", type=float, default=20.0,
                   help="seconds a silenced node stays stopped before it is removed and its capacity comes back")
    p.add_argument("--notice-warning", type=float, default=30.0,
                   help="warning of an AWS or Azure notice in seconds (GCP's is 30 s; AWS gives 120 s in reality)")
    p.add_argument("--global-batch", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--raytrain-faults", type=int, default=None,
                   help="faults for the Ray Train arm (default: min(--faults, 9), one of each kind: "
                        "its recoveries take tens of seconds each)")
    p.add_argument("--raytrain-health-timeout", type=float, default=10.0,
                   help="RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S of the Ray Train arm (Ray's default: 600)")
    p.add_argument("--raytrain-timeout", type=float, default=None, help="deadline of the Ray Train arm (seconds)")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    p.add_argument("--trial-dir", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.steps is None:
        a.steps = 100 * a.faults + 50
    if a.raytrain_faults is None:
        a.raytrain_faults = min(a.faults, 9)
    a.raytrain_steps = a.steps if (a.trial or a.raytrain_faults == a.faults) else 100 * a.raytrain_faults + 50
    if a.raytrain_timeout is None:
        a.raytrain_timeout = 120 + 60 * a.raytrain_faults + a.raytrain_steps * 0.2
    if a.trial == "raytrain":
        trial_raytrain(a, Path(a.trial_dir))
        return 0
    arms = [x for x in a.arms.split(",") if x]
    unknown = set(arms) - set(ARMS)
    if unknown:
        print(f"resume_rate: unknown arms {sorted(unknown)}; known: {ARMS}", file=sys.stderr)
        return 2
    fault_kinds(a)
    C.set_threads(1)
    report: dict[str, Any] = {
        "benchmark": "resume_rate",
        "command": C.command_line("resume_rate", argv),
        "config": {k: v for k, v in vars(a).items() if k not in ("trial", "trial_dir")},
        "machine": C.machine_info(),
        "arms": {},
    }
    with C.deadline(a.timeout), tempfile.TemporaryDirectory(prefix="resume-rate-") as tmp:
        work = Path(tmp)
        for arm in arms:
            t0 = time.time()
            res = run_elastictrain(a, work) if arm == "elastictrain" else run_raytrain(a, work)
            report["arms"][arm] = res
            s = res.get("summary")
            print(f"[{arm}] done in {time.time() - t0:.0f} s: " + (json.dumps({k: v for k, v in s.items() if k != "by_kind"}, default=str) if s else res.get("skipped", "")), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(report, out / "resume_rate.png")
    jp, mp = C.write_report(out, "resume_rate", report, markdown(report))
    print(markdown(report))
    print(f"wrote {jp}, {mp}" + (f", {report['plot']}" if report["plot"] else ""))
    et = report["arms"].get("elastictrain", {}).get("summary")
    if et is None:
        return 0
    ok = et["finished"] and et["resume_rate"] == 1.0 and (et["steps_redone_max_per_fault"] or 0) <= 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
