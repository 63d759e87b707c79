"""Which manifests and chunks to delete: keep the newest `keep_last` checkpoints of the run.

Pure: decides from listings, decoded manifest bodies and which manifests verified
(`trust.ManifestVerifier`); the runner deletes manifests first, then chunks, so a
crash between the two only leaves garbage.

Only manifests that verify as the run's own are counted, kept, compared or deleted,
and none newer than the checkpoint just committed: a manifest someone planted (a
copy under a huge step, an edited one, one signed by another key) can neither push
the run's real checkpoints out of the `keep_last` window nor be deleted itself;
it stays where it is, with the chunks it lists, for `elastictrain ckpt verify` to
report.
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
    failed: frozenset[str] = frozenset(), *, verified: frozenset[str], committed: Optional[str],
) -> RetentionPlan:
    """Plan deletions.

    Args:
        bodies: every manifest name -> its decoded body, or None if it does not decode.
        chunk_files: every stored name under chunks/ -> size; only names of chunks are ever deleted.
        keep_last: how many of this run's verified manifests survive.
        run: this run's id; other runs' manifests are never deleted and their chunks are kept.
        failed: manifests a restore found damaged, or under a key it lacks. They do not count as kept (a checkpoint saved after
            falling back to an older step would otherwise be retired in favour of the damaged newer
            one); those that verify go once older than every kept one.
        verified: the manifests whose signature and identity verified as this run's (`ManifestVerifier`);
            no other manifest is counted or deleted.
        committed: the manifest the save just wrote: never deleted, and nothing newer is counted or deleted
            (None: no bound, for a planner with no save of its own).
    """
    bound = parse_manifest_name(committed) if committed is not None else None

    def ours(name: str) -> bool:
        body, key = bodies.get(name), parse_manifest_name(name)
        return (
            name in verified and body is not None and body.run == run and key is not None
            and (bound is None or key <= bound)
        )

    counted = sorted((parse_manifest_name(n), n) for n in bodies if ours(n) and n not in failed)
    kept = {n for _, n in counted[-keep_last:]}
    doomed = {n for _, n in counted if n not in kept}
    if len(counted) >= keep_last:  # the run's own damaged checkpoints go once older than every kept one
        oldest_kept = counted[-keep_last][0]
        doomed |= {n for n in failed if n in bodies and ours(n) and parse_manifest_name(n) < oldest_kept}
    doomed.discard(committed)
    remaining = [b for n, b in bodies.items() if n not in doomed]
    if any(b is None for b in remaining):
        return RetentionPlan(tuple(sorted(doomed)), ())  # cannot tell which chunks a damaged one needs
    referenced = {chunk_path(cid) for b in remaining for cid, _ in b.chunks}
    unreferenced = {n for n in chunk_files if is_chunk_path(n)} - referenced
    return RetentionPlan(tuple(sorted(doomed)), tuple(sorted(unreferenced)))
