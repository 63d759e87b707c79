"""A rank 0 cannot run code on, exhaust, or hand a wrong model to the ranks it broadcasts its state to
(spawned gloo processes on 127.0.0.1, no Ray). The forged headers go through the real broadcast path:
rank 0 runs `take_rank0_state` with its header's JSON encoder swapped for one that forges."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import types

import torch

import elastictrain.runtime.state as state_mod
from elastictrain.runtime.state import ElasticState, fingerprint, take_rank0_state
from tests.alloc_spy import spy_on_empty
from tests.gloo_ranks import run_ranks

CPU = torch.device("cpu")
SCENARIOS = ["pickle", "huge", "stranger_tensor", "wrong_shape", "bad_dtype", "genuine"]
ALLOCATION_SPY_BYTES = 1 << 20


class _Exec:
    """A pickle whose loading runs code: it writes the marker file named in `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _state(seed: int, trained: bool) -> ElasticState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    if trained:  # AdamW's state appears with its first step: a fresh receiver has none
        model(torch.randn(8, 6)).sum().backward()
        opt.step()
    state = ElasticState({"model": model, "optimizer": opt, "tokens": 3})
    state.step = 5 if trained else 0
    return state


def _forge(scenario: str, marker: str):
    """A stand-in for the state module's `json` whose `dumps` forges the header of `scenario`."""

    def dumps(obj, **kwargs):
        if scenario == "pickle":
            return pickle.dumps(_Exec(marker), protocol=0).decode("ascii")
        layout = obj["layout"]
        if scenario == "huge":  # optimizer state a fresh receiver lacks, announced at 4 TiB
            layout.append(["objects/optimizer/state/0/exp_avg_sq_extra", [1 << 40], "float32", "cpu"])
        elif scenario == "stranger_tensor":
            layout.append(["objects/model/9.weight", [4, 4], "float32", "cpu"])
        elif scenario == "wrong_shape":
            layout[[e[0] for e in layout].index("objects/model/0.weight")][1] = [4096, 4096]
        elif scenario == "bad_dtype":
            layout[[e[0] for e in layout].index("objects/model/0.weight")][2] = "complex32"
        return json.dumps(obj, **kwargs)

    return types.SimpleNamespace(dumps=dumps, loads=json.loads)


def _spy_allocations(log: list) -> None:
    """Note every `torch.empty` a receiver calls; refuse any above 1 MiB (this test never needs one)."""

    def note(dims, dtype, nbytes):
        log.append([list(dims), str(dtype)])
        if nbytes > ALLOCATION_SPY_BYTES:
            raise MemoryError(f"the receiver allocated {nbytes} bytes for {list(dims)}")

    spy_on_empty(note)


def _member(rank: int) -> dict:
    marker_dir = os.environ["ET_TEST_MARKER_DIR"]
    got: dict = {}
    allocations: list = []
    if rank != 0:
        _spy_allocations(allocations)
    for scenario in SCENARIOS:
        state = _state(seed=7, trained=True) if rank == 0 else _state(seed=rank + 10, trained=False)
        if rank == 0:
            state_mod.json = _forge(scenario, os.path.join(marker_dir, "ran"))
        del allocations[:]
        try:
            take_rank0_state(state, device=CPU)
            got[scenario] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            got[scenario] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            state_mod.json = json
        got[scenario].update(fingerprint=fingerprint(state.agreed_tree()).tolist(), step=state.step,
                             opt_state=len(state.optimizer.state))
        got[scenario]["tensor_allocations"] = [a for a in allocations if a[1] != "torch.uint8"]  # not the header's
    return got


def test_forged_headers_are_refused_on_every_rank_before_allocation_and_a_genuine_state_passes():
    with tempfile.TemporaryDirectory() as tmp:
        # the payload is live: loading it writes its marker
        pickle.loads(pickle.dumps(_Exec(os.path.join(tmp, "control")), protocol=0))
        assert os.path.exists(os.path.join(tmp, "control"))
        os.environ["ET_TEST_MARKER_DIR"] = tmp
        try:
            got = run_ranks(_member, 3)
        finally:
            del os.environ["ET_TEST_MARKER_DIR"]
        ran = os.path.exists(os.path.join(tmp, "ran"))
    assert not ran, "a receiver unpickled the header"
    receivers = [got[1], got[2]]
    expected = {
        "pickle": "malformed",
        "huge": "exp_avg_sq_extra.* over the .* bytes this rank accepts",
        "stranger_tensor": "model tensor 'objects/model/9.weight', which this rank's 'model' does not have",
        "wrong_shape": r"'objects/model/0.weight' as float32\[4096, 4096\]; this rank's is float32\[5, 6\]",
        "bad_dtype": "dtype 'complex32', not one a state may carry",
    }
    for scenario, pattern in expected.items():
        for r in receivers:
            outcome = r[scenario]
            assert not outcome["ok"], (scenario, outcome)
            assert outcome["error"].startswith("StateRefused: refused the state"), (scenario, outcome)
            assert re.search(pattern, outcome["error"]), (scenario, outcome)
            assert outcome["tensor_allocations"] == [], (scenario, outcome)  # refused before allocating
        # rank 0 learns the verdict too instead of blocking in a broadcast
        assert not got[0][scenario]["ok"] and "refused the state rank 0 broadcast" in got[0][scenario]["error"]
    # a genuine state with AdamW's state reaches fresh receivers, which had none
    genuine = [got[r]["genuine"] for r in range(3)]
    assert all(g["ok"] for g in genuine), genuine
    assert genuine[0]["fingerprint"] == genuine[1]["fingerprint"] == genuine[2]["fingerprint"]
    assert [g["step"] for g in genuine] == [5, 5, 5] and genuine[1]["opt_state"] == genuine[0]["opt_state"] > 0
