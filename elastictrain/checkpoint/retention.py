"""Which manifests and chunks to delete: keep the newest `keep_last` checkpoints of the run.

Pure: decides from listings and decoded manifest bodies; the manager deletes
manifests first, then chunks, so a crash between the two only leaves garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from elastictrain.checkpoint.manifest import Body, chunk_path, is_chunk_path, parse_manifest_name


@dataclass(frozen=True)
class RetentionPlan:
    manifests: tuple[str, ...]
    chunks: tuple[str, ...]


def plan_retention(
    bodies: dict[str, Optional[Body]], chunk_files: dict[str, int], keep_last: int, run: str,
    failed: frozenset[str] = frozenset(),
) -> RetentionPlan:
    """Plan deletions.

    Args:
        bodies: every manifest name -> its decoded body, or None if it does not decode.
        chunk_files: every stored name under chunks/ -> size; only names of chunks are ever deleted.
        keep_last: how many of this run's decodable manifests survive.
        run: this run's id; other runs' manifests are never deleted and their chunks are kept.
        failed: manifests a restore found damaged, or under a key it lacks. They do not count as kept (a checkpoint saved after
            falling back to an older step would otherwise be retired in favour of the damaged newer
            one); like manifests that do not decode, they go once older than every kept one.
    """

    def damaged(name: str, body: Optional[Body]) -> bool:
        return body is None or (name in failed and body.run == run)

    ours = sorted(
        (parse_manifest_name(n), n) for n, b in bodies.items() if not damaged(n, b) and b.run == run
    )
    kept = {n for _, n in ours[-keep_last:]}
    oldest_kept = ours[-keep_last][0] if len(ours) >= keep_last else (0, 0)
    doomed = {n for _, n in ours if n not in kept}
    for name, body in bodies.items():  # damaged manifests older than every kept one are garbage
        key = parse_manifest_name(name)
        if damaged(name, body) and key is not None and key < oldest_kept and len(ours) >= keep_last:
            doomed.add(name)
    remaining = [b for n, b in bodies.items() if n not in doomed]
    if any(b is None for b in remaining):
        return RetentionPlan(tuple(sorted(doomed)), ())  # cannot tell which chunks a damaged one needs
    referenced = {chunk_path(cid) for b in remaining for cid, _ in b.chunks}
    unreferenced = {n for n in chunk_files if is_chunk_path(n)} - referenced
    return RetentionPlan(tuple(sorted(doomed)), tuple(sorted(unreferenced)))
