"""The frozen view of the world a worker is in; a new one after every rebuild."""

from __future__ import annotations

from dataclasses import dataclass

from elastictrain.election.term import WorldPlan


@dataclass(frozen=True)
class WorldInfo:
    """Rank is a value handed out per term, never a cached global."""

    term: int
    rank: int
    world_size: int
    member_id: str
    leader_id: str
    plan: WorldPlan

    @property
    def is_leader(self) -> bool:
        return self.member_id == self.leader_id

    @classmethod
    def from_plan(cls, plan: WorldPlan, member_id: str) -> "WorldInfo":
        rank = plan.rank_of(member_id)
        if rank is None:
            raise ValueError(f"member {member_id} is not in the world of term {plan.term}")
        return cls(
            term=plan.term,
            rank=rank,
            world_size=plan.world_size,
            member_id=member_id,
            leader_id=plan.leader,
            plan=plan,
        )
