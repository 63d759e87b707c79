"""What an election decides over: members, their liveness, and the world a leader publishes for a term.

Plain values that travel as JSON through the store; the decisions are in `election.policy`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from elastictrain.election.heartbeat import Seen

NO_STATE = -1
"""`committed_step` of a member that holds no training state (a new or restarted worker)."""


@dataclass(frozen=True)
class Member:
    """What a worker says about itself when it registers or joins a term."""

    id: str
    joined_at: float
    committed_step: int = NO_STATE
    node_id: str = ""
    host: str = ""
    labels: dict = field(default_factory=dict)
    detected_at: Optional[float] = None
    """When this member saw the previous world fail (wall time), for recovery reports."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Member":
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Liveness:
    """When the observer last saw a member's heartbeat change (its own monotonic clock), and whether
    the driver saw its process die or it left."""

    heartbeat: Optional[float]
    dead: bool = False
    left: bool = False
    seen: Optional[Seen] = None
    """The observer's record of the member's beats and training progress."""


@dataclass(frozen=True)
class WorldPlan:
    """The world a leader publishes for a term. Rank r is `members[r]`.

    Rank 0 holds the newest committed state (the source of any broadcast).
    """

    term: int
    leader: str
    members: tuple[str, ...]
    steps: tuple[int, ...]
    host: str
    port: int
    published_at: float = 0.0
    detected_at: Optional[float] = None
    labels: tuple[dict, ...] = field(default=(), hash=False)
    """Each rank's node labels (`labels[r]` of `members[r]`); what the topology's named groups are made of."""

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def source_step(self) -> int:
        """The step the world resumes from; NO_STATE when no member holds state."""
        return self.steps[0] if self.steps else NO_STATE

    @property
    def needs_sync(self) -> bool:
        """Some member is behind the source (or new), so rank 0 broadcasts its state."""
        return any(s != self.source_step for s in self.steps)

    @property
    def restore_from_storage(self) -> bool:
        """No member holds state: rank 0 reads the newest checkpoint (if any) and broadcasts."""
        return self.source_step == NO_STATE

    def rank_of(self, member_id: str) -> Optional[int]:
        try:
            return self.members.index(member_id)
        except ValueError:
            return None

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "WorldPlan":
        data = json.loads(raw)
        data["members"] = tuple(data["members"])
        data["steps"] = tuple(data["steps"])
        data["labels"] = tuple(dict(x) for x in data.get("labels", ()))
        return cls(**data)


_MOVED = {
    "is_live": "is_live",
    "preference_key": "preference_key",
    "leader_preference": "leader_preference",
    "plan_world": "assign_ranks",
    "GatherDecision": "GatherDecision",
    "decide_gather": "decide_gather",
    "should_grow": "should_grow",
}


def __getattr__(name: str):
    """The decisions moved to `elastictrain.election.policy`; the old names still resolve, with a warning."""
    if name in _MOVED:
        import warnings

        from elastictrain.election import policy

        warnings.warn(f"elastictrain.election.term.{name} moved to elastictrain.election.policy.{_MOVED[name]}",
                      DeprecationWarning, stacklevel=2)
        return getattr(policy, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
