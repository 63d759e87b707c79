"""Each runner's record of the terms it was in and the steps each committed, from which the leader that
saves writes a checkpoint's lineage (`elastictrain.checkpoint.provenance`). Pure: no Ray, no torch.

Why it survives leader changes: every member keeps, for each term it was in, the world it joined (its
members with their node facts) and the steps it committed there; whichever member saves next has the
terms since the last checkpoint as far as it saw them. A member that never saw an earlier term (it
joined later, receiving the state) does not invent it: those steps are listed as a gap. History
rewritten by a restore (a world resuming from an older step) is dropped at the next commit, so only the
terms that produced the saved state are named. Bounded: `max_terms` newest terms are kept (older ones
fall into the gap, counted as dropped), `MAX_MEMBERS` members per term (the rest counted as dropped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from elastictrain.accumulate.plan import plan_rank
from elastictrain.checkpoint.provenance import MAX_MEMBERS, MAX_TERMS, MAX_TEXT, MEMBER_FACTS


@dataclass
class _Term:
    term: int
    members: tuple[dict, ...]  # rank order: MEMBER_FACTS strings each
    global_batch: int
    micro_batch: int
    lo: Optional[int] = None  # first step committed in this term (as this member saw it)
    hi: Optional[int] = None  # one past the last


def member_facts(member: str, node: dict, labels: Optional[dict] = None, attestation: str = "") -> dict:
    """A lineage member's string facts from its node ({"node_id", "host"}) and labels (provider, region, ...)."""
    labels = labels or {}
    facts = {"member": member, "node": node.get("node_id", ""), "host": node.get("host", ""),
             "attestation": attestation}
    for name in ("provider", "region", "zone", "instance_type", "accelerator"):
        facts[name] = "" if labels.get(name) is None else labels[name]
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", facts["attestation"] or ""):
        facts["attestation"] = ""  # whatever else a member record says is not a digest
    return {k: re.sub(r"[^\x20-\x7e]", "?", str(facts[k]))[:MAX_TEXT] for k in MEMBER_FACTS}


class LineageBook:
    """The terms this member was in and the steps committed in each (see the module docstring).

    Args:
        max_terms: terms kept; the oldest beyond it are forgotten.
    """

    def __init__(self, max_terms: int = MAX_TERMS) -> None:
        self.max_terms = max_terms
        self._terms: list[_Term] = []
        self.dropped_terms = 0
        self.last_saved: Optional[int] = None  # the newest checkpoint step this member knows of

    def joined(self, term: int, members: Sequence[dict], global_batch: int, micro_batch: int) -> None:
        """This member entered `term`, whose rank r is `members[r]` (`member_facts`)."""
        self._terms = [t for t in self._terms if t.term != term]
        self._terms.append(_Term(term, tuple(dict(m) for m in members), global_batch, micro_batch))
        self._trim()

    def committed(self, term: int, step: int) -> None:
        """Step `step` (its index: it consumed positions [step*G, (step+1)*G)) committed in `term`. Any
        other term's record of `step` or later is history a restore rewrote: dropped."""
        for t in self._terms:
            if t.term != term and t.hi is not None and t.hi > step:
                t.hi = max(t.lo, step)
        current = next((t for t in self._terms if t.term == term), None)
        if current is None:
            return
        if current.lo is None or step < current.lo or (current.hi is not None and step > current.hi):
            current.lo = step  # first commit here, or a jump: only a contiguous run is claimed
        current.hi = step + 1
        self._terms = [t for t in self._terms if t is current or (t.hi or 0) > (t.lo or 0)]

    def saved(self, step: int) -> None:
        """A checkpoint of the steps before `step` committed (or was restored): terms wholly before it go,
        but for the newest one, which may still be committing."""
        self.last_saved = step if self.last_saved is None else max(self.last_saved, step)
        newest = self._terms[-1] if self._terms else None
        self._terms = [t for t in self._terms if t is newest or t.hi is None or t.hi > step]

    def _trim(self) -> None:
        while len(self._terms) > self.max_terms:
            self._terms.pop(0)
            self.dropped_terms += 1

    def lineage(self, to_step: int, from_step: Optional[int] = None) -> dict:
        """The lineage of the steps [from_step, to_step) (default: since the last checkpoint this member
        knows of, else from 0), in the manifest's form."""
        start = from_step if from_step is not None else (self.last_saved or 0)
        start = min(start, to_step)
        terms, covered = [], []
        for t in sorted(self._terms, key=lambda t: (t.lo if t.lo is not None else -1, t.term)):
            if t.lo is None:
                continue
            lo, hi = max(t.lo, start), min(t.hi, to_step)
            if lo >= hi:
                continue
            covered.append((lo, hi))
            members = []
            for rank, facts in enumerate(t.members[:MAX_MEMBERS]):
                plan = plan_rank(t.global_batch, t.micro_batch, len(t.members), rank)
                members.append({**facts, "rank": rank, "positions": {
                    "start": lo * t.global_batch + plan.start, "stop": lo * t.global_batch + plan.stop,
                    "stride": t.global_batch, "count": hi - lo}})
            terms.append({"term": t.term, "steps": [lo, hi], "world_size": len(t.members),
                          "global_batch": t.global_batch, "dropped_members": max(0, len(t.members) - MAX_MEMBERS),
                          "members": members})
        gaps, at = [], start
        for lo, hi in sorted(covered):
            if lo > at:
                gaps.append([at, lo])
            at = max(at, hi)
        if at < to_step:
            gaps.append([at, to_step])
        complete = not gaps and not any(t["dropped_members"] for t in terms)
        return {"from_step": start, "to_step": to_step, "complete": complete, "gaps": gaps,
                "dropped_terms": self.dropped_terms if gaps else 0, "terms": terms}


def world_facts(plan, records: Sequence) -> list[dict]:
    """`member_facts` of each rank of a world plan (`WorldPlan`), from its labels and the members' own
    records of the term (`Member`: node id, host, attestation digest); a member without a record keeps
    its labels and empty node facts."""
    by_id = {r.id: r for r in records}
    out = []
    for rank, member in enumerate(plan.members):
        record = by_id.get(member)
        labels = plan.labels[rank] if rank < len(plan.labels) else (record.labels if record else {})
        node = {"node_id": record.node_id, "host": record.host} if record else {}
        out.append(member_facts(member, node, labels, getattr(record, "attestation", "") if record else ""))
    return out
