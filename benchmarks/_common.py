"""Shared pieces of the benchmarks.

Everything every benchmark (and every arm of one) must agree on lives here, so
that the benchmarks differ only in what they measure and the arms only in the
framework under test:

- the flags every benchmark accepts (`--out`, `--repeats`, `--seed`,
  `--timeout`, `--quick`; `BenchmarkParser`), old spellings kept as hidden
  aliases that say they are deprecated, and a deadline for `--timeout`;
- the model and the synthetic data set (seeded; the same bytes in every arm);
- the once-only kill (rank 1 SIGKILLs itself at a given step, guarded by a marker
  file that records the kill time);
- the per-step log (one JSON line per completed optimizer step, per process) and
  the analysis that turns it into recovery time and steps redone;
- running a child process with a hard deadline and killing its whole process
  group when it overruns; a free port on 127.0.0.1;
- timing, medians, and the JSON + Markdown report.

This module imports torch but no Ray, torchft or elastictrain, so worker
processes of every arm can import it cheaply.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Command line: the flags every benchmark shares
# ---------------------------------------------------------------------------

COMMON_FLAGS = ("--out", "--repeats", "--seed", "--timeout", "--quick")


class BenchmarkTimeout(BaseException):
    """A benchmark ran past its `--timeout`.

    A BaseException, like KeyboardInterrupt, so that a benchmark's own
    `except Exception` (which records a failed run as a finding) lets it through.
    """


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: sets the new option's value and says it is deprecated."""

    def __init__(self, option_strings, dest, new_option: str, **kwargs) -> None:
        self.new_option = new_option
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new_option}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` (hidden from --help) as a spelling of the already added option `new`."""
    target = parser._option_string_actions[new]
    parser.add_argument(old, dest=target.dest, type=target.type, action=_DeprecatedAlias, new_option=new,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    repeats: Optional[int],
    seed: Optional[int] = 0,
    timeout: Optional[float] = None,
    out: str = "bench-out",
    help: Optional[Mapping[str, str]] = None,
) -> None:
    """Add --out, --repeats, --seed, --timeout and --quick; `help` overrides a flag's help by its name."""
    text = {
        "out": f"folder for the JSON and Markdown reports (default: {out})",
        "repeats": f"repeats of the measurement (default: {repeats})",
        "seed": f"seed of the model and the data (default: {seed})",
        "timeout": "deadline of the whole benchmark in seconds (default: none)",
        "quick": "the short run",
        **(help or {}),
    }
    parser.add_argument("--out", default=out, metavar="DIR", help=text["out"])
    parser.add_argument("--repeats", type=int, default=repeats, metavar="N", help=text["repeats"])
    parser.add_argument("--seed", type=int, default=seed, metavar="N", help=text["seed"])
    parser.add_argument("--timeout", type=float, default=timeout, metavar="S", help=text["timeout"])
    parser.add_argument("--quick", action="store_true", help=text["quick"])
    add_deprecated_alias(parser, "--rounds", "--repeats")


def add_workers_arg(parser: argparse.ArgumentParser, default: int, help: str = "worker processes") -> None:
    """--workers N, with the old spelling --world kept as a deprecated alias."""
    parser.add_argument("--workers", type=int, default=default, metavar="N", help=f"{help} (default: {default})")
    add_deprecated_alias(parser, "--world", "--workers")


class BenchmarkParser(argparse.ArgumentParser):
    """The argument parser of one benchmark: its own flags plus the shared ones.

    `quick` maps option names (dests) to the values of the benchmark's short
    run: with --quick they replace the defaults, and a flag given on the command
    line still wins. `no_effect` maps a shared flag's name to why it does not
    apply to this benchmark: the flag is accepted (so `python -m benchmarks all`
    can pass it to every benchmark) and a line says it changes nothing.

        p = BenchmarkParser("accumulate", __doc__, repeats=15, quick={"repeats": 3})
        p.add_argument("--micro-steps", type=int, default=8)
        a = p.parse_args(["--quick"])  # a.repeats == 3
    """

    def __init__(
        self,
        name: str,
        doc: Optional[str],
        *,
        repeats: Optional[int],
        timeout: Optional[float] = None,
        quick: Optional[Mapping[str, Any]] = None,
        no_effect: Optional[Mapping[str, str]] = None,
        help: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(prog=f"python -m benchmarks {name}", description=summary_line(doc), allow_abbrev=False)
        self.quick_defaults = dict(quick or {})
        self.no_effect = dict(no_effect or {})
        text = dict(help or {})
        if self.quick_defaults:
            shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.quick_defaults.items())
            text.setdefault("quick", f"the short run: {shown}")
        for flag, why in self.no_effect.items():
            text[flag] = f"no effect here: {why}"
        add_common_args(self, repeats=repeats, timeout=timeout, help=text)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        argv = list(sys.argv[1:] if args is None else args)
        if namespace is None and self.quick_defaults and _wants_quick(argv):
            unknown = set(self.quick_defaults) - {a.dest for a in self._actions}
            if unknown:
                raise ValueError(f"{self.prog}: quick defaults for unknown options {sorted(unknown)}")
            namespace = argparse.Namespace(**self.quick_defaults)  # defaults never overwrite what is set
        parsed = super().parse_args(argv, namespace)
        for flag in self.no_effect:
            if getattr(parsed, flag) != self.get_default(flag):
                print(f"{self.prog}: --{flag} has no effect here ({self.no_effect[flag]})", file=sys.stderr)
        return parsed


def _wants_quick(argv: Sequence[str]) -> bool:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--quick", action="store_true")
    return pre.parse_known_args(list(argv))[0].quick


def summary_line(doc: Optional[str]) -> str:
    """The first paragraph of a docstring, on one line."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split())


def command_line(name: str, argv: Optional[Sequence[str]]) -> str:
    """How to run this benchmark again, for its report."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m benchmarks", name, *args])


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raise BenchmarkTimeout in the main thread once `seconds` have passed (None or 0: no deadline)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise BenchmarkTimeout(f"ran past --timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

# ---------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------

# "tiny": the recovery benchmark's model; a step is dominated by a sleep so the
# kill lands mid-run. "work": the overhead benchmark's model, sized so that one
# step is some tens of milliseconds of real compute per worker on one thread.
MODEL_SHAPES = {
    "tiny": (32, 64, 1),
    "work": (256, 1024, 1),
}


def set_threads(n: int = 1) -> None:
    """One intra-op thread per worker: several workers share a few cores."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def make_model(kind: str = "tiny", seed: int = 0, hidden: Optional[int] = None) -> nn.Module:
    """The MLP of `kind`; `hidden` widens its three hidden layers (about 2*hidden**2 parameters)."""
    d_in, width, d_out = MODEL_SHAPES[kind]
    hidden = hidden or width
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, d_out),
    )


def make_dataset(kind: str = "tiny", n: int = 8192, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Seeded regression data: y = a fixed random projection of x plus noise."""
    d_in = MODEL_SHAPES[kind][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g) / d_in**0.5
    y = x @ w + 0.01 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_sum(model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed squared error of a batch and its item count."""
    x, y = batch[0], batch[1]
    return ((model(x) - y) ** 2).sum(), int(x.shape[0])


def global_batch_indices(step: int, global_batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Samples [step*G, (step+1)*G) of a seeded per-epoch permutation."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_batch : (k + 1) * global_batch]


def micro_batches(
    dataset: torch.utils.data.TensorDataset, step: int, global_batch: int, micro: int, rank: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of step `step`'s global batch, in micro-batches (baseline arms)."""
    idx = global_batch_indices(step, global_batch, len(dataset))
    mine = idx.tensor_split(world)[rank]
    x, y = dataset.tensors
    return [(x[part], y[part]) for part in mine.split(micro)]


# ---------------------------------------------------------------------------
# Kill once, log steps, analyse
# ---------------------------------------------------------------------------


def maybe_kill(marker: str | os.PathLike, rank: int, step: int, kill_rank: int, kill_step: int) -> None:
    """SIGKILL this process when rank matches and step >= kill_step, once per run.

    The marker file is created exclusively, so only the first attempt kills;
    it holds the wall-clock kill time, written and fsynced just before the kill.
    """
    if rank != kill_rank or step < kill_step:
        return
    try:
        fd = os.open(os.fspath(marker), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    t = time.time()
    os.write(fd, json.dumps({"t": t, "rank": rank, "step": step, "pid": os.getpid()}).encode())
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class StepLog:
    """Appends one JSON line per completed step to `<dir>/steps-<pid>.jsonl`.

    A line is written after the step's optimizer update was applied, flushed at
    once so a SIGKILL loses nothing already written.
    """

    def __init__(self, log_dir: str | os.PathLike, rank: int, attempt: Any = None):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.attempt = attempt
        self._f = open(Path(log_dir) / f"steps-{os.getpid()}.jsonl", "a", buffering=1)

    def step(self, step: int, **extra: Any) -> None:
        rec = {"step": int(step), "t": time.time(), "rank": self.rank, "pid": os.getpid()}
        if self.attempt is not None:
            rec["attempt"] = self.attempt
        rec.update(extra)
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._f.close()


def read_step_logs(log_dir: str | os.PathLike) -> list[dict]:
    out = []
    for p in sorted(Path(log_dir).glob("steps-*.jsonl")):
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line
                    pass
    out.sort(key=lambda r: r["t"])
    return out


def read_kill(marker: str | os.PathLike) -> Optional[dict]:
    try:
        return json.loads(Path(marker).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def step_gap(records: list[dict], before_t: Optional[float]) -> Optional[float]:
    """The median time between consecutive steps of one process, over the steps completed before
    `before_t` (all of them when None)."""
    by_pid: dict[Any, list[float]] = {}
    for r in records:
        if before_t is None or r["t"] <= before_t:
            by_pid.setdefault(r["pid"], []).append(r["t"])
    gaps = [b - a for ts in by_pid.values() for a, b in zip(ts, ts[1:])]
    return statistics.median(gaps) if gaps else None


def analyse_recovery(records: list[dict], kill: Optional[dict], total_steps: int) -> dict:
    """Recovery figures of one run, defined the same way for every arm.

    Records are per (process, step): one per optimizer update applied, labelled
    with the rank (or replica) that applied it. The killer dies at the start of
    step K, having applied steps < K.

    - steps_redone: distinct step indices applied before the kill and applied
      again after it under the same rank label: updates the kill cost;
    - steps_redone_total: distinct step indices applied more than once at all
      (differs only when something else failed too, e.g. a second restart);
    - recovery_s: time from the kill to the first record after it that is new
      progress or a redo, i.e. not a straggler (a rank finishing, just after the
      kill, a step < K that it had not applied before);
    - completed: every step index in [0, total_steps) was applied.
    """
    res: dict[str, Any] = {"killed": kill is not None}
    steps_done = {r["step"] for r in records}
    res["completed"] = all(s in steps_done for s in range(total_steps))
    res["last_step"] = max(steps_done) if steps_done else None
    seen: dict[Any, set] = {}
    before: dict[Any, set] = {}
    redone: set = set()
    redone_at_kill: set = set()
    first_after = None
    tk = kill["t"] if kill else None
    for r in records:  # in time order
        mine = seen.setdefault(r["rank"], set())
        repeat = r["step"] in mine
        if repeat:
            redone.add(r["step"])
        mine.add(r["step"])
        if tk is not None and r["t"] <= tk:
            before.setdefault(r["rank"], set()).add(r["step"])
        elif tk is not None and r["step"] in before.get(r["rank"], ()):
            redone_at_kill.add(r["step"])
        if tk is not None and first_after is None and r["t"] > tk and (repeat or r["step"] >= kill["step"]):
            first_after = r
    res["steps_redone"] = len(redone_at_kill) if tk is not None else None
    res["steps_redone_total"] = len(redone)
    res["redone_steps"] = sorted(redone)
    # Which step ranges each process ran, in start order: shows restarts and resume points.
    spans: dict[int, list] = {}
    for r in records:
        span = spans.setdefault(r["pid"], [r["rank"], r["step"], r["step"], r["t"]])
        span[2] = r["step"]
    res["process_spans"] = [
        {"rank": rk, "first_step": a, "last_step": b}
        for rk, a, b, _ in sorted(spans.values(), key=lambda x: x[3])
    ]
    if kill is None:
        res["recovery_s"] = None
        return res
    res["kill_step"] = kill["step"]
    res["recovery_s"] = first_after["t"] - tk if first_after else None
    res["first_step_after_kill"] = first_after["step"] if first_after else None
    return res


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def kill_group(pgid: int, grace_s: float = 3.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_child(
    cmd: Sequence[str],
    timeout_s: Optional[float],
    log_path: str | os.PathLike,
    env: Optional[dict] = None,
    cwd: Optional[str | os.PathLike] = None,
) -> dict:
    """Run `cmd` in its own session with a hard deadline (None: none); output goes to log_path.

    On overrun (or on our own exit by an exception) the whole process group is
    killed; afterwards any straggler in the group is killed too.
    """
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The group may hold grandchildren (Ray's raylet and workers, torchrun's ranks).
            if proc.poll() is None:
                kill_group(proc.pid)
                proc.wait()
            else:
                kill_group(proc.pid, grace_s=1.0)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": time.monotonic() - t0}


def tail(path: str | os.PathLike, n: int = 2000) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Statistics and reports
# ---------------------------------------------------------------------------


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    """The median of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def time_call(fn: Callable[[], Any], sync: Optional[Callable[[], Any]] = None) -> float:
    """Wall-clock seconds of `fn()`; `sync` (a device synchronise) runs before the start and before the stop."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def fmt(v: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}{suffix}"
    return f"{v}{suffix}"


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": sys.platform,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("ray", "torchft", "elastictrain"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = None
    return info


def write_report(out_dir: str | os.PathLike, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """`<out_dir>/<name>.json` (every figure) and `<name>.md` (the tables); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    jp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mp.write_text(markdown)
    return jp, mp


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def ddp_accumulate(model: nn.Module, mbs: Sequence[Sequence[torch.Tensor]], global_batch: int) -> float:
    """Backward over micro-batches with one all-reduce (DDP no_sync on all but the last).

    The loss is the summed error divided by the global batch size, so the
    gradient is that of the global batch's mean whatever the world size.
    Returns the summed loss of this rank's micro-batches.
    """
    total = 0.0
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        ctx = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with ctx:
            loss, _ = loss_sum(model, mb)
            (loss / global_batch).backward()
        total += float(loss.detach())
    return total
