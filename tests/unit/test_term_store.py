"""The term's rendezvous store: gloo forms its group through it, values are sealed under the run
secret, and a value planted by someone without the secret is refused, never connected to."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elastictrain.election.store import MemoryStore
from elastictrain.runtime.term_store import TermStore, prune_terms, term_prefix
from elastictrain.secret import RunSecret


def test_values_are_sealed_and_bound_to_their_key():
    kv, secret = MemoryStore(), RunSecret.generate()
    store = TermStore(kv, 3, secret, timeout_s=2)
    store.set("0//cpu//0/0", b"address-of-rank-0")
    raw = kv.get(term_prefix(3) + "0//cpu//0/0")
    assert raw is not None and b"address-of-rank-0" not in raw  # nobody reading Ray's store learns the address
    assert store.get("0//cpu//0/0") == b"address-of-rank-0"
    # the same sealed value copied under another rank's key does not open there
    kv.put(term_prefix(3) + "0//cpu//0/1", raw)
    with pytest.raises(RuntimeError, match="does not open under the run secret"):
        store.get("0//cpu//0/1")
    # another run's value under the same secret does not open in this one
    other_run = TermStore(kv, 3, secret, timeout_s=2, scope="elastictrain/other-run")
    with pytest.raises(RuntimeError, match="does not open"):
        other_run.get("0//cpu//0/0")


def test_a_value_planted_without_the_secret_is_refused():
    kv = MemoryStore()
    store = TermStore(kv, 1, RunSecret.generate(), timeout_s=2)
    stranger = TermStore(kv, 1, RunSecret.generate(), timeout_s=2)
    stranger.set("0//cpu//0/1", b"stranger's address")
    with pytest.raises(RuntimeError, match="refusing to connect"):
        store.get("0//cpu//0/1")
    kv.put(term_prefix(1) + "0//cpu//0/2", b"plain bytes")
    with pytest.raises(RuntimeError, match="does not open"):
        store.get("0//cpu//0/2")


def test_wait_is_bounded():
    store = TermStore(MemoryStore(), 1, RunSecret.generate(), timeout_s=0.2)
    with pytest.raises(RuntimeError, match="timed out"):
        store.wait(["never-written"])
    assert not store.check(["never-written"])


def test_add_counts_every_call_once_under_contention():
    store = TermStore(MemoryStore(), 1, RunSecret.generate(), timeout_s=2)
    results: list[int] = []
    lock = threading.Lock()

    def bump():
        for _ in range(20):
            value = store.add("counter", 1)
            with lock:
                results.append(value)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == list(range(1, 81))  # every total seen exactly once: no lost update


def test_compare_set_and_delete():
    store = TermStore(MemoryStore(), 1, RunSecret.generate(), timeout_s=2)
    assert store.compare_set("k", b"", b"one") == b"one"
    assert store.compare_set("k", b"zzz", b"two") == b"one"
    assert store.compare_set("k", b"one", b"two") == b"two"
    assert store.num_keys() == 1
    assert store.delete_key("k") and store.num_keys() == 0


def test_prune_keeps_the_current_and_newer_terms():
    kv, secret = MemoryStore(), RunSecret.generate()
    for term in (1, 2, 3):
        TermStore(kv, term, secret, timeout_s=1).set("x", b"v")
    kv.put("member/a", b"not a rendezvous key")
    assert prune_terms(kv, 3) == 2
    assert sorted(kv.keys("")) == ["member/a", term_prefix(3) + "x"]


def test_gloo_forms_a_group_through_the_store(monkeypatch):
    """Two gloo ranks (threads of this process, on loopback) rendezvous through a TermStore and all-reduce."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    kv, secret = MemoryStore(), RunSecret.generate()
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            store = TermStore(kv, 7, secret, timeout_s=20)
            pg = dist.ProcessGroupGloo(store, r, 2)
            x = torch.full((3,), float(r + 1))
            pg.allreduce([x]).wait()
            out[r] = x
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            out[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(out.get(r), torch.Tensor) for r in range(2)), out
    assert all(torch.equal(out[r], torch.full((3,), 3.0)) for r in range(2))
    assert kv.keys(term_prefix(7))  # the addresses went through the store


def test_a_peer_that_never_comes_fails_the_world_not_the_users_code(monkeypatch):
    """The timeout surfaces through gloo as a store error, which the runtime takes for a failed world
    (a rebuild), as it did a TCPStore's; a plain RuntimeError would read as train_fn raising."""
    from elastictrain.runtime.process_group import is_collective_failure
    from elastictrain.runtime.runner import WORLD_CHANGED, classify_exit

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = TermStore(MemoryStore(), 1, RunSecret.generate(), timeout_s=60)
    with pytest.raises(dist.DistStoreError) as err:
        dist.ProcessGroupGloo(store, 0, 2, timedelta(seconds=0.3))  # gloo's timeout bounds its waits
    assert is_collective_failure(err.value) and classify_exit(err.value) == WORLD_CHANGED
