"""Spread placement on a local `ray.cluster_utils.Cluster` with nodes of three providers in two regions:
the initial spread obeys `max_share`; a provider's nodes removed, the run goes on unmet; re-added, the
spread returns through a clean leave at a step boundary."""

from __future__ import annotations

import time
from collections import Counter

import pytest

import elastictrain as et
from elastictrain.fleet.spread import room_by_value
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.fault.test_cluster import FAILURE, _head, cluster, hold_until_a_member_is_lost  # noqa: F401 (fixtures)
from tests.conftest import _wait_for
from tests.toy_runs import BATCH, assert_matches_one_process

pytestmark = pytest.mark.slow

TASK = ToyTask(total_steps=12, step_sleep_s=0.05)
LABELS = {
    "aws": {"provider": "aws", "region": "us-east-1"},
    "gcp": {"provider": "gcp", "region": "europe-west4"},
    "azure": {"provider": "azure", "region": "europe-west4"},
}
HOLD_S = 120.0


def room_now() -> dict[str, int]:
    """Free worker slots per provider, as the driver reads them."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    nodes = [(n.get("Labels") or {}, free.get(n["NodeID"], {})) for n in ray.nodes() if n.get("Alive")]
    return room_by_value(nodes, "provider", {"CPU": 1.0})


class LoseAProviderThenGetItBack:
    """At step 2 of the first (whole) world, remove every node of the provider of a follower; once the driver
    says the spread is unmet, add that provider's node back; note each step the worker loops wait on."""

    def __init__(self, cluster, providers: dict[str, str]) -> None:
        self.cluster, self.providers = cluster, providers  # node id -> provider
        self.first_world: list[str] = []
        self.last_world: list[str] = []
        self.lost_provider = None

    def _world(self, view) -> list[str]:
        return sorted(self.providers.get(info["node_id"], "?") for info in view.members().values())

    def on_progress(self, view) -> None:
        members = view.members()
        if members:
            self.last_world = self._world(view)
        if self.lost_provider is None and view.step >= 2 and len(members) == 3 and view.term == 1:
            self.first_world = self._world(view)
            follower = sorted(m for m, info in members.items() if not info["leader"])[0]
            node_id = members[follower]["node_id"]
            self.lost_provider = self.providers[node_id]
            for node in [n for n in self.cluster.worker_nodes if self.providers.get(n.node_id) == self.lost_provider]:
                self.cluster.remove_node(node, allow_graceful=False)
            view.note_fault(follower, provider_removed=self.lost_provider)

    def on_event(self, view, event) -> None:
        if event["kind"] == "spread_unmet" and self.lost_provider is not None:
            node = self.cluster.add_node(num_cpus=2, labels=LABELS[self.lost_provider])
            self.providers[node.node_id] = self.lost_provider
        elif event["kind"] == "spread_restored":
            view.note_fault("spread", restored=True)  # the second noted fault releases the loop


def hold_through_the_spread(lost_at: int):
    """An `on_step`: the first world holds at `lost_at` until a member of it was lost; every later world holds
    each step until the spread was restored (the second noted fault), letting a step end only for a member
    asked to leave, so the leave that restores the spread happens at a step boundary and the run cannot
    finish before it."""
    lost = hold_until_a_member_is_lost(lost_at, HOLD_S)
    until: list[float] = []  # one deadline per worker process, for all its held steps together

    def on_step(ctx, step: int) -> None:
        if ctx.term == 1:
            lost(ctx, step)
            return
        session = ctx._session
        runner, members = session.runner, list(session.world.plan.members)
        until.append(until[0] if until else time.monotonic() + HOLD_S)
        store, deadline = runner.election.store, until[0]
        while len(store.keys("faults/")) < 2 and time.monotonic() < deadline:
            if any(runner.election.asked_to_leave(m) for m in members) or runner.stopping.wait(0.02):
                return

    return on_step


@pytest.mark.timeout(300)
def test_spread_across_providers_survives_losing_one_and_returns(cluster):
    nodes = {name: cluster.add_node(num_cpus=2, labels=labels) for name, labels in LABELS.items()}
    cluster.wait_for_nodes()
    # the first starts are planned from the free resources each node reports: wait until all three do
    assert _wait_for(lambda: len(room_now()) == 3 and set(room_now().values()) == {2}, timeout=60), room_now()
    script = LoseAProviderThenGetItBack(cluster, {node.node_id: name for name, node in nodes.items()})
    result = et.ElasticTrainer(
        make_train_fn(TASK, on_step=hold_through_the_spread(3)),
        # 3 workers, at most 0.4 of them (1) on one provider
        scaling=et.ScalingConfig(min_workers=2, max_workers=3, spread_by="provider", max_share=0.4,
                                 spread_pending_timeout_s=20),
        batch=BATCH,
        failure=FAILURE.model_copy(update={"startup_wait_s": HOLD_S}),
        network=et.NetworkConfig(allow_plaintext=True),  # nodes of one machine, labelled as three providers
        callbacks=[script],
    ).fit()

    assert script.first_world == ["aws", "azure", "gcp"], "the first world broke the cap"
    kinds = [e["kind"] for e in result.events]
    assert "worker_lost" in kinds, "removing the provider's node took no worker"
    unmet = next(e for e in result.events if e["kind"] == "spread_unmet")
    assert script.lost_provider not in unmet["counts"] and max(unmet["counts"].values()) == 2 and unmet["cap"] == 1
    assert unmet["max_share"] == 0.4 and abs(sum(unmet["shares"].values()) - 1) < 1e-3
    move = next(e for e in result.events if e["kind"] == "spread_move")
    assert move["to"] == script.lost_provider and move["away_from"] != script.lost_provider
    restored = next(e for e in result.events if e["kind"] == "spread_restored")
    assert kinds.index("spread_unmet") < kinds.index("spread_move") < kinds.index("spread_restored")
    assert restored["counts"] == {"aws": 1, "azure": 1, "gcp": 1}
    # the over-share worker left cleanly at a step boundary: a leave, not a loss
    assert any(e["kind"] == "worker_left" and e["member"] == move["member"] for e in result.events)
    assert Counter(script.last_world) == Counter(["aws", "azure", "gcp"]), script.last_world
    assert result.steps == TASK.total_steps
    assert result.steps_redone <= 1  # at most the step in flight when the node vanished
    assert_matches_one_process(result, TASK)
