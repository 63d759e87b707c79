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
    attestation: str = ""
    """'sha256:<hex>' of the signed identity its cloud gave this member's node; '' when none."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Member":
        """The member in `raw`.

        Raises:
            ValueError: not JSON, or not a member (unknown or missing fields, wrong types).
        """
        data = _object(raw, "member")
        _fields(data, {"id", "joined_at"}, {f for f in cls.__dataclass_fields__})
        if not (_name(data["id"]) and _number(data["joined_at"]) and _int(data.get("committed_step", NO_STATE))
                and data.get("committed_step", NO_STATE) >= NO_STATE and isinstance(data.get("node_id", ""), str)
                and isinstance(data.get("host", ""), str) and _labels(data.get("labels", {}))
                and (data.get("detected_at") is None or _number(data["detected_at"]))
                and isinstance(data.get("attestation", ""), str) and len(data.get("attestation", "")) <= 80):
            raise ValueError("a member record with a field of the wrong type")
        return cls(**data)


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
        """The world in `raw`.

        Raises:
            ValueError: not JSON, or not a world (unknown or missing fields, wrong types, lengths that disagree).
        """
        data = _object(raw, "world")
        _fields(data, {"term", "leader", "members", "steps", "host", "port"}, set(cls.__dataclass_fields__))
        members, steps, labels = data["members"], data["steps"], data.get("labels", [])
        if not (_int(data["term"]) and data["term"] > 0 and _name(data["leader"]) and isinstance(members, list)
                and all(_name(m) for m in members) and len(set(members)) == len(members)
                and isinstance(steps, list) and len(steps) == len(members)
                and all(_int(x) and x >= NO_STATE for x in steps)
                and isinstance(labels, list) and len(labels) in (0, len(members)) and all(_labels(x) for x in labels)
                and isinstance(data["host"], str) and _int(data["port"]) and 0 <= data["port"] < 65536
                and _number(data.get("published_at", 0.0))
                and (data.get("detected_at") is None or _number(data["detected_at"]))):
            raise ValueError("a world record with a field of the wrong type")
        data["members"] = tuple(data["members"])
        data["steps"] = tuple(data["steps"])
        data["labels"] = tuple(dict(x) for x in data.get("labels", ()))
        return cls(**data)


MAX_NAME = 256


def _object(raw: bytes, what: str) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"a {what} record that is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"a {what} record that is not a JSON object")
    return data


def _fields(data: dict, required: set, known: set) -> None:
    if not required <= set(data) or not set(data) <= known:
        raise ValueError(f"a record with fields {sorted(data)[:20]}; needs {sorted(required)}, knows {sorted(known)}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and value == value


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _labels(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
                                           for k, v in value.items())


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
