"""The shape of a world: every rank's labels and the named groups the runtime builds for it.

`plan_topology` is pure (values in, values out), beside the election policy that assigns the
ranks. The runtime builds one process group per named group and hands each user of a
collective (DDP, the accumulator, the boundary vote, the state transfer) its group by name,
never the implicit default group.

Names:
- `"world"`: every rank.
- `"<label>:<value>"`: the ranks whose node carries `label=value`, one group per value of each
  label the policy groups by (say `"region:us-east"`); a node without the label has value `""`.
- `"leaders:<label>"`: the lowest rank of each `"<label>:<value>"` group, in rank order (the
  outer group of a two-level world).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

WORLD = "world"
LEADERS = "leaders"


@dataclass(frozen=True)
class TopologyPolicy:
    """Which named groups a world has beyond `"world"`.

    Attributes:
        group_by: node label names; each gives a group per label value and a group of their leaders.
    """

    group_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label in self.group_by:
            if not label or ":" in label or label == LEADERS:
                raise ValueError(f"group_by label {label!r} must be a non-empty label name without ':', "
                                 f"other than {LEADERS!r}")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError(f"group_by {self.group_by!r} names a label twice")


@dataclass(frozen=True)
class Topology:
    """Ranks, their members and labels, and named groups of ranks.

    Attributes:
        members: member id of each rank (rank r is `members[r]`).
        labels: node labels of each rank.
        groups: name -> ranks of that group, ascending; always has `"world"`.
    """

    members: tuple[str, ...]
    labels: tuple[Mapping[str, str], ...]
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.members)

    def ranks(self, name: str) -> tuple[int, ...]:
        """The ranks of group `name`.

        Raises:
            KeyError: no such group in this world (the message lists the names there are).
        """
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(f"no group {name!r} in this world; groups: {sorted(self.groups)}") from None

    def leaders(self, label: str) -> str:
        """The name of the group of each `label` group's lowest rank."""
        return self._known(f"{LEADERS}:{label}", label)

    def group_of(self, rank: int, label: str) -> str:
        """The name of the `label` group that `rank` belongs to (say `"region:eu-west"`)."""
        return self._known(f"{label}:{self.labels[rank].get(label, '')}", label)

    def _known(self, name: str, label: str) -> str:
        if name not in self.groups:
            raise KeyError(f"this world does not group by {label!r}; groups: {sorted(self.groups)}")
        return name

    def groups_of(self, rank: int) -> tuple[str, ...]:
        """Every group `rank` belongs to, in the order the runtime creates them."""
        return tuple(name for name in self.names() if rank in self.groups[name])

    def names(self) -> tuple[str, ...]:
        """Group names in creation order: `"world"` first, then sorted. Every rank creates every group
        in this order (process-group creation is collective over the whole world)."""
        return (WORLD, *sorted(n for n in self.groups if n != WORLD))


def plan_topology(
    members: Sequence[str],
    labels: Optional[Sequence[Mapping[str, str]]] = None,
    policy: TopologyPolicy = TopologyPolicy(),
) -> Topology:
    """The topology of a world whose rank r is `members[r]` with node labels `labels[r]`.

    Raises:
        ValueError: the members repeat, or `labels` does not have one entry per member.
    """
    members = tuple(members)
    if len(set(members)) != len(members):
        raise ValueError(f"a member appears twice in the world: {members}")
    labels = tuple(MappingProxyType(dict(x)) for x in (labels if labels is not None else [{}] * len(members)))
    if len(labels) != len(members):
        raise ValueError(f"{len(labels)} label sets for {len(members)} members: give one per rank")
    groups: dict[str, tuple[int, ...]] = {WORLD: tuple(range(len(members)))}
    for label in policy.group_by:
        by_value: dict[str, list[int]] = {}
        for rank, node_labels in enumerate(labels):
            by_value.setdefault(str(node_labels.get(label, "")), []).append(rank)
        for value, ranks in by_value.items():
            groups[f"{label}:{value}"] = tuple(ranks)
        groups[f"{LEADERS}:{label}"] = tuple(sorted(ranks[0] for ranks in by_value.values()))
    return Topology(members=members, labels=labels, groups=MappingProxyType(groups))
