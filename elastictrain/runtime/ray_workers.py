"""The driver's `Workers` backend on Ray: one actor per worker, a hub actor for their records."""

from __future__ import annotations

from typing import Any, Callable

from elastictrain.errors import TrainingFailed
from elastictrain.events import Event
from elastictrain.runtime.driver import WorkerExit
from elastictrain.runtime.records import check_result, clip
from elastictrain.runtime.spec import RunSpec


class RayWorkers:
    """Worker actors of one run, placed with the options the driver's placement policy gives, and the
    hub they send records to.

    The hub lives on the driver's node: a worker node that vanishes must not take it along.
    """

    def __init__(self, spec: RunSpec, train_fn: Callable) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from elastictrain.runtime.hub import Hub

        self.ray = ray
        self.spec = spec
        self.train_fn = train_fn
        here = ray.get_runtime_context().get_node_id()
        self.hub = Hub.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        self.actors: dict[str, Any] = {}
        self.refs: dict[Any, str] = {}
        self.identities: dict[str, Any] = {}  # workers not yet seen placed: their identity() calls

    def start(self, member_id: str, options: dict[str, Any]) -> None:
        from elastictrain.runtime.worker import WorkerActor

        actor = WorkerActor.options(**options).remote(member_id, self.spec, self.hub)
        self.actors[member_id] = actor
        self.refs[actor.run.remote(self.train_fn)] = member_id
        if self.spec.scaling.spread_by:
            self.identities[member_id] = actor.identity.remote()  # answers once the actor runs on a node

    def kill(self, member_id: str) -> None:
        self.identities.pop(member_id, None)
        actor = self.actors.get(member_id)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def exits(self, timeout_s: float) -> list[WorkerExit]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout_s)
        return [self._exit(ref) for ref in ready]

    def _exit(self, ref) -> WorkerExit:
        ray = self.ray
        member_id = self.refs.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, TrainingFailed):
                return WorkerExit(member_id, error=clip(cause.reason))
            return WorkerExit(member_id, lost=type(exc).__name__)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            return WorkerExit(member_id, lost=type(exc).__name__)
        malformed = check_result(out)
        if malformed is not None:  # its run is over and unaccounted for: it counts as lost
            self.kill(member_id)
            return WorkerExit(member_id, lost=f"malformed run result ({malformed})")
        return WorkerExit(member_id, status=out["status"], step=out.get("step"))

    def placements(self) -> dict[str, dict[str, str]]:
        """Node labels of the workers placed since the last call (spread placement); a worker that died
        before it was placed is listed with no labels."""
        if not self.identities:
            return {}
        members = {ref: m for m, ref in self.identities.items()}
        ready, _ = self.ray.wait(list(members), num_returns=len(members), timeout=0)
        out: dict[str, dict[str, str]] = {}
        for ref in ready:
            member = members[ref]
            del self.identities[member]
            try:
                labels = self.ray.get(ref).get("labels")
            except Exception:  # noqa: BLE001 - it died before or while placed
                labels = None
            out[member] = {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)
                           and len(k) <= 253 and len(v) <= 63} if isinstance(labels, dict) else {}
        return out

    def capacity(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """Each live node's labels and free resources (where spread placement has room)."""
        try:
            from ray._private.state import available_resources_per_node

            free = available_resources_per_node()
            nodes = self.ray.nodes()
        except Exception:  # noqa: BLE001 - no capacity known: starts go relaxed where Ray finds room
            return []
        return [(dict(n.get("Labels") or {}), dict(free.get(n["NodeID"], {})))
                for n in nodes if n.get("Alive") and n.get("NodeID") in free]

    def running(self) -> list[str]:
        return list(self.refs.values())

    def pull(self) -> list[Event]:
        return self.ray.get(self.hub.pull.remote())

    def draining_nodes(self) -> set[str]:
        try:
            from ray._private.state import state

            return set(state.get_draining_nodes())
        except Exception:  # noqa: BLE001 - not every Ray version has it; draining then goes unseen
            return set()

    def close(self) -> None:
        for member_id in list(self.actors):
            self.kill(member_id)
        try:
            self.ray.kill(self.hub)
        except Exception:  # noqa: BLE001
            pass
