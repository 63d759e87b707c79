"""A run's report from its event log alone: resume rate, goodput, steps redone, GPU-hours and dollars.

`compute(events, manifests, prices)` is pure (no Ray, no storage); `report_files.write(report, out_dir)`
makes `report.md`, `report.json` and PNG plots. The numbers, as `report.json` names them (docs/reports.md):

- A *run* is one `fit()`: its events follow its `log_opened` line (a resubmitted job is a later run).
  A *world* is (run, term); worlds are ordered by run, then term.
- `steps_committed`: step commits, one per step per world that committed it (`steps` lines).
- `steps_redone`: commits of a step that a later world committed again (its work was lost).
- `goodput`: commits never redone / all commits (= distinct steps / `steps_committed`); None without commits.
- `faults`: each fault injected (`fault_injected`, those sharing a schedule `index` in a run are one), and
  each `worker_lost` of a member no fault was injected on before (an unplanned loss). A fault hits the
  newest world of its run that had formed (a `joined`) by its time.
- `resume_rate`: faults after which a later world (this run's, or a later run's) committed a step /
  all faults; None without faults. A fault's `recovery_s`: from the fault to that world's first commit.
- A worker's GPUs: its `joined` event's `gpus` (resources_per_worker['GPU'] with use_gpu); a worker
  with none counts as 1 (so CPU runs get comparable numbers). `gpu_count_basis` says which applied.
- A worker is *held* from its `worker_started` (else its first `joined`) to its `worker_lost` or
  `worker_left`, else to its run's last event. `gpu_hours`: GPUs x hours held, by provider (the node's
  `provider` label; "unknown" for a worker that never joined a world).
- `effective_gpu_hours`: for each world, its GPUs (summed over its members) x the time from its forming
  (first `joined`) to its last commit, times the share of its commits never redone.
- `steps_by_provider` / `steps_by_region`: each commit split over its world's members equally, added up
  by their label; `largest_provider_share`: the largest provider's part of all commits.
- `bytes_across_boundaries`: checkpoint bytes (`checkpoint` events' `bytes_written`) written by a world
  whose leader's provider or region differs from the bucket's (`[bucket]` in the prices file); 0 with a
  note when the bucket's place is unknown. `bytes_across_boundaries_by`: the same bytes by boundary,
  'provider/region->provider/region' (writer -> bucket).
- `policy_violations` (with `allowed_regions`, the jurisdiction policy): each world member whose region
  is outside it (`violation` "worker") and each checkpoint upload from or to a region outside it (`violation`
  "checkpoint_upload", with its bytes); `policy_violated`: whether there is any (None without a policy).
- With prices: `cost_by_provider_instance` (worker-hours held x the hourly price of the worker's
  `instance_type`), `setup_cost` (workers started x `setup_per_worker`), `egress_cost` (checkpoint GB,
  1e9 bytes, from a provider to another provider's bucket x its `egress_per_gb`, to another region of
  its own x `inter_region_per_gb`), `cost_total` (their sum) and `cost_per_effective_gpu_hour` =
  `cost_total` / `effective_gpu_hours`. `setup_hours`: worker-hours from `worker_started` to first `joined`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Iterable, Optional

from elastictrain.fleet.report_prices import Prices

UNKNOWN = "unknown"
MAX_POINTS = 2000
"""Points kept per plotted series (long runs are thinned evenly)."""
MAX_SPAN = 100_000
"""Steps one `steps` line may cover (a flush every second covers far fewer); a longer span is cut."""


@dataclass
class _World:
    run: int
    term: int
    members: dict[str, dict] = field(default_factory=dict)  # member -> its joined facts
    formed: float = math.inf
    leader: Optional[str] = None
    steps: dict[int, float] = field(default_factory=dict)  # step -> commit time

    @property
    def key(self) -> tuple[int, int]:
        return (self.run, self.term)


@dataclass
class _Worker:
    run: int
    started: Optional[float] = None
    joined: Optional[float] = None
    ended: Optional[float] = None
    facts: dict = field(default_factory=dict)


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _runs(events: Iterable[dict]) -> list[list[dict]]:
    runs: list[list[dict]] = []
    for record in events:
        if record.get("kind") == "log_opened" or not runs:
            runs.append([])
        runs[-1].append(record)
    return runs


def _gpus(facts: dict) -> float:
    gpus = _num(facts.get("gpus"))
    return gpus if gpus is not None and gpus > 0 else 1.0


def compute(events: list[dict], manifests: Optional[list[dict]] = None, prices: Optional[Prices] = None,
            allowed_regions: Optional[Iterable[str]] = None) -> dict:
    """The report of the run(s) whose event log is `events` (see the module docstring for each number).

    Args:
        events: checked log events in log order (`report_log.read_events(...).events`).
        manifests: stored checkpoints, `{"step", "term", "time", "provenance", ...}` each (listed as is).
        prices: parsed prices (`report_prices.load_prices`); None: no dollars.
        allowed_regions: the run's jurisdiction policy (region label values); None: no policy.
    """
    worlds: dict[tuple[int, int], _World] = {}
    workers: dict[tuple[int, str], _Worker] = {}
    faults: list[dict] = []
    checkpoints: list[tuple[int, dict]] = []
    run_ends: list[float] = []
    notes: list[str] = []
    times = [float(e["time"]) for e in events]
    t0 = min(times) if times else 0.0
    for run, records in enumerate(_runs(events)):
        run_ends.append(max(float(e["time"]) for e in records))
        by_index: dict[int, dict] = {}
        faulted: set[str] = set()
        for e in records:
            kind, when = e["kind"], float(e["time"])
            member = e.get("member") if isinstance(e.get("member"), str) else None
            if kind == "steps" and isinstance(e.get("term"), int):
                world = worlds.setdefault((run, e["term"]), _World(run, e["term"]))
                first, last = e["first"], e["last"]
                begin = _num(e.get("first_time"))
                begin = when if begin is None else begin
                for step in range(first, min(last, first + MAX_SPAN) + 1):
                    at = begin + (when - begin) * (step - first) / max(1, last - first)
                    world.steps[step] = min(world.steps.get(step, math.inf), at)
            elif kind == "joined" and member is not None and isinstance(e.get("term"), int):
                world = worlds.setdefault((run, e["term"]), _World(run, e["term"]))
                world.members[member] = e
                world.formed = min(world.formed, when)
                if e.get("leader") is True:
                    world.leader = member
                w = workers.setdefault((run, member), _Worker(run))
                w.joined = when if w.joined is None else min(w.joined, when)
                w.facts = e
            elif kind == "worker_started" and member is not None:
                workers.setdefault((run, member), _Worker(run)).started = when
            elif kind in ("worker_lost", "worker_left") and member is not None:
                w = workers.setdefault((run, member), _Worker(run))
                w.ended = when if w.ended is None else min(w.ended, when)
                if kind == "worker_lost" and member not in faulted:
                    faults.append({"run": run, "time": when, "fault": "lost", "index": None, "members": [member]})
                    faulted.add(member)
            elif kind == "fault_injected" and member is not None:
                faulted.add(member)
                index = e.get("index")
                if isinstance(index, int) and index in by_index:
                    by_index[index]["members"].append(member)
                    continue
                fault = {"run": run, "time": when, "fault": str(e.get("fault") or "injected"),
                         "index": index if isinstance(index, int) else None, "members": [member]}
                faults.append(fault)
                if isinstance(index, int):
                    by_index[index] = fault
            elif kind == "checkpoint":
                checkpoints.append((run, e))

    # --- commits, redone, goodput ------------------------------------------------------------
    order = sorted(worlds)
    last_world: dict[int, tuple[int, int]] = {}  # step -> the last world that committed it
    for key in order:
        for step in worlds[key].steps:
            last_world[step] = key
    commits = sum(len(w.steps) for w in worlds.values())
    distinct = len(last_world)
    kept_by_world = {key: sum(1 for s in worlds[key].steps if last_world[s] == key) for key in order}

    # --- faults and recoveries -----------------------------------------------------------------
    faults.sort(key=lambda f: f["time"])
    for fault in faults:
        formed = [w.term for w in worlds.values() if w.run == fault["run"] and w.formed <= fault["time"]]
        fault["term"] = max(formed, default=0)
        hit = (fault["run"], fault["term"])
        later = [min(w.steps.values()) for w in worlds.values() if w.key > hit and w.steps
                 and min(w.steps.values()) > fault["time"]]
        first = min(later, default=None)
        fault["resumed"] = first is not None
        fault["recovery_s"] = None if first is None else first - fault["time"]
        fault["at_s"] = fault["time"] - t0
    resumed = sum(1 for f in faults if f["resumed"])
    recoveries = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]

    # --- hours ---------------------------------------------------------------------------------
    gpu_hours: dict[str, float] = {}
    worker_hours: dict[tuple[str, Optional[str]], float] = {}
    setup_hours = 0.0
    started_by_provider: dict[str, int] = {}
    basis = set()
    for (run, _member), w in workers.items():
        start = w.started if w.started is not None else w.joined
        if start is None:
            continue
        end = w.ended if w.ended is not None else run_ends[run]
        hours = max(0.0, end - start) / 3600
        provider = str(w.facts.get("provider", UNKNOWN))
        gpus = _gpus(w.facts)
        basis.add("gpus" if _num(w.facts.get("gpus")) else "one per worker without a GPU")
        gpu_hours[provider] = gpu_hours.get(provider, 0.0) + gpus * hours
        key = (provider, w.facts.get("instance_type"))
        worker_hours[key] = worker_hours.get(key, 0.0) + hours
        if w.started is not None:
            started_by_provider[provider] = started_by_provider.get(provider, 0) + 1
            if w.joined is not None:
                setup_hours += max(0.0, w.joined - w.started) / 3600
    effective = 0.0
    for key in order:
        world = worlds[key]
        if not world.steps or not world.members or not math.isfinite(world.formed):
            continue
        span = max(0.0, max(world.steps.values()) - world.formed) / 3600
        effective += sum(_gpus(f) for f in world.members.values()) * span * kept_by_world[key] / len(world.steps)

    # --- where the steps ran ------------------------------------------------------------------
    steps_by: dict[str, dict[str, float]] = {"provider": {}, "region": {}}
    series: dict[str, list[tuple[float, float]]] = {}
    timeline = sorted((at, key) for key in order for at in worlds[key].steps.values())
    totals: dict[str, float] = {}
    for at, key in timeline:
        members = worlds[key].members
        if not members:
            continue
        for facts in members.values():
            for label in ("provider", "region"):
                value = str(facts.get(label, UNKNOWN))
                steps_by[label][value] = steps_by[label].get(value, 0.0) + 1 / len(members)
            name = f"{facts.get('provider', UNKNOWN)}/{facts.get('region', UNKNOWN)}"
            totals[name] = totals.get(name, 0.0) + 1 / len(members)
            series.setdefault(name, []).append((at - t0, totals[name]))
    largest = max(steps_by["provider"].values(), default=None)

    # --- checkpoint bytes across boundaries -----------------------------------------------------
    bucket_provider = prices.bucket_provider if prices else None
    bucket_region = prices.bucket_region if prices else None
    across = 0
    across_by: dict[str, int] = {}
    allowed = None if allowed_regions is None else set(allowed_regions)
    violations: list[dict] = []
    if allowed is not None:
        for w in sorted(worlds.values(), key=lambda w: (w.run, w.term)):
            for member, facts in sorted(w.members.items()):
                if facts.get("region") not in allowed:
                    violations.append({"violation": "worker", "run": w.run, "term": w.term, "member": member,
                                       "region": facts.get("region", UNKNOWN)})
    egress_bytes: dict[tuple[str, str], int] = {}  # (provider, "provider" | "region") -> bytes
    for run, e in checkpoints:
        size = e.get("bytes_written")
        if not isinstance(size, int) or size <= 0:
            continue
        world = worlds.get((run, e.get("term")))
        writer = world.members.get(world.leader, {}) if world and world.leader else {}
        provider, region = writer.get("provider"), writer.get("region")
        outside = [r for r in (region, bucket_region) if r is not None and allowed is not None and r not in allowed]
        if outside:
            violations.append({"violation": "checkpoint_upload", "run": run, "term": e.get("term"), "step": e.get("step"),
                               "from": f"{provider or UNKNOWN}/{region or UNKNOWN}",
                               "to": f"{bucket_provider or UNKNOWN}/{bucket_region or UNKNOWN}", "bytes": size,
                               "outside": sorted(set(outside))})
        if bucket_provider is None or provider is None:
            continue
        if provider != bucket_provider:
            crossed = "provider"
        elif bucket_region is not None and region is not None and region != bucket_region:
            crossed = "region"
        else:
            continue
        across += size
        name = f"{provider}/{region or UNKNOWN}->{bucket_provider}/{bucket_region or UNKNOWN}"
        across_by[name] = across_by.get(name, 0) + size
        egress_bytes[(provider, crossed)] = egress_bytes.get((provider, crossed), 0) + size
    if bucket_provider is None:
        notes.append("bytes_across_boundaries is 0: the bucket's provider is unknown (set [bucket] in the prices file)")
    notes.append("traffic between providers other than checkpoint uploads (collectives) is not measured")

    report: dict[str, Any] = {
        "runs": len(_runs(events)) if events else 0,
        "steps_committed": commits,
        "distinct_steps": distinct,
        "steps_redone": commits - distinct,
        "goodput": distinct / commits if commits else None,
        "faults": len(faults),
        "faults_resumed": resumed,
        "resume_rate": resumed / len(faults) if faults else None,
        "recovery_s_median": median(recoveries) if recoveries else None,
        "recovery_s_max": max(recoveries) if recoveries else None,
        "gpu_hours": gpu_hours,
        "gpu_hours_total": sum(gpu_hours.values()),
        "gpu_count_basis": sorted(basis),
        "effective_gpu_hours": effective,
        "setup_hours": setup_hours,
        "steps_by_provider": steps_by["provider"],
        "steps_by_region": steps_by["region"],
        "largest_provider_share": largest / commits if largest is not None and commits else None,
        "bytes_across_boundaries": across,
        "bytes_across_boundaries_by": across_by,
        "policy_violations": violations,
        "policy_violated": bool(violations) if allowed is not None else None,
        "checkpoints_logged": len(checkpoints),
        "checkpoint_bytes": sum(e.get("bytes_written") or 0 for _, e in checkpoints
                                if isinstance(e.get("bytes_written"), int)),
        "manifests": list(manifests or []),
        "fault_list": [{k: f[k] for k in ("run", "fault", "index", "members", "term", "at_s", "resumed", "recovery_s")}
                       for f in faults],
        "world_sizes": [[w.formed - t0, len(w.members), w.run, w.term] for w in sorted(worlds.values(),
                        key=lambda w: w.formed) if math.isfinite(w.formed)],
        "steps_over_time": {name: _thin(points) for name, points in series.items()},
        "currency": prices.currency if prices else None,
        "cost_total": None,
        "cost_per_effective_gpu_hour": None,
        "notes": notes,
    }
    if prices is not None:
        report.update(_costs(prices, worker_hours, started_by_provider, egress_bytes, effective, notes))
    return report


def _costs(prices: Prices, worker_hours: dict, started: dict, egress_bytes: dict, effective: float,
           notes: list[str]) -> dict:
    by_instance: dict[str, float] = {}
    unpriced = 0.0
    for (provider, instance), hours in sorted(worker_hours.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        table = prices.providers.get(provider)
        price = table.hourly_for(instance) if table else None
        if price is None:
            unpriced += hours
            continue
        name = f"{provider}/{instance or 'default'}"
        by_instance[name] = by_instance.get(name, 0.0) + hours * price
    if unpriced:
        notes.append(f"{unpriced:.4f} worker-hours have no price (provider or instance type not in the prices file)")
    setup = sum(count * prices.providers[p].setup_per_worker for p, count in started.items() if p in prices.providers)
    egress = 0.0
    for (provider, crossed), size in egress_bytes.items():
        table = prices.providers.get(provider)
        if table is not None:
            rate = table.egress_per_gb if crossed == "provider" else table.inter_region_per_gb
            egress += size / 1e9 * rate
    total = sum(by_instance.values()) + setup + egress
    return {
        "cost_by_provider_instance": by_instance,
        "unpriced_worker_hours": unpriced,
        "setup_cost": setup,
        "egress_cost": egress,
        "cost_total": total,
        "cost_per_effective_gpu_hour": total / effective if effective > 0 else None,
    }


def _thin(points: list[tuple[float, float]]) -> list[list[float]]:
    if len(points) <= MAX_POINTS:
        return [list(p) for p in points]
    stride = len(points) / MAX_POINTS
    picked = [points[int(i * stride)] for i in range(MAX_POINTS - 1)] + [points[-1]]
    return [list(p) for p in picked]
