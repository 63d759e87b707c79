"""Carries out retention after a save: reads and verifies the manifests, plans (`retention.plan_retention`), deletes.

Manifests go first, each delete checked, then the chunks nothing references:
a crash or a failed delete in between leaves only garbage chunks, which the
next save's retention lists and deletes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from elastictrain.checkpoint.catalog import manifest_names
from elastictrain.checkpoint.manifest import CHUNK_DIR, MANIFEST_DIR
from elastictrain.checkpoint.retention import plan_retention
from elastictrain.checkpoint.storage import Storage
from elastictrain.checkpoint.trust import ManifestVerifier
from elastictrain.checkpoint.writer import ChunkWriter

# A temporary file of a local put this much older than now belongs to a writer that died: no chunk
# or manifest write of a live one takes an hour.
STALE_TEMP_S = 3600.0


class RetentionRunner:
    """Keeps the newest `keep_last` checkpoints of a run and deletes the rest and their unshared chunks.

    Args:
        storage: the run's storage.
        writer: its chunk writer, which forgets the chunks deleted here.
        verifier: checks which manifests are the run's own (signature and identity; no chunk is read).
        keep_last, io_threads: from CheckpointConfig.
        fence: whether a term may still write; only the current term's writer deletes.
        failed: manifests a restore found damaged or under a key it lacks (shared with the restore side):
            they do not count as kept.
        emit: records an event (`emit(kind, **facts)`).
        clock: seconds since the epoch.
    """

    def __init__(
        self, storage: Storage, writer: ChunkWriter, verifier: ManifestVerifier, *, keep_last: int,
        io_threads: int, fence: Optional[Callable[[int], bool]], failed: set[str], emit: Callable[..., None],
        clock: Callable[[], float],
    ):
        self.storage, self.writer, self.verifier = storage, writer, verifier
        self.keep_last, self.io_threads = keep_last, io_threads
        self.fence, self.failed = fence, failed
        self._emit: Callable[..., Any] = emit
        self._clock = clock
        self._swept_at: Optional[float] = None  # when temporaries were last swept

    def apply(self, run: str, term: int, chunk_files: dict[str, int], committed: Optional[str] = None) -> None:
        """Delete what `keep_last` retires, given the chunk listing taken before the save of `term`.

        `committed`: the manifest that save wrote; it is never deleted, and nothing newer is counted.
        """
        names = manifest_names(self.storage)
        # every manifest read and verified again, each save: one damaged or replaced since the last save
        # must not count as kept
        checked = self.verifier.check_all(self.storage, names, self.io_threads, run)
        self.failed.intersection_update(names)
        self.failed.discard(committed)  # written again just now: what a restore found of that name is gone
        plan = plan_retention(
            {c.name: c.body for c in checked}, chunk_files, self.keep_last, run, frozenset(self.failed),
            verified=frozenset(c.name for c in checked if c.verified), committed=committed,
        )
        # A newer term's leader may be saving already, and reuse a chunk this plan, made without its
        # manifest, would delete: only the current term's writer deletes, checked right before each step.
        if (plan.manifests or plan.chunks) and not self._still_current(term):
            return
        self.storage.delete(plan.manifests)
        if plan.chunks and not self._still_current(term):
            return
        # chunks may go in batches whose failures nobody reports (they are listed, and tried, next time)
        getattr(self.storage, "discard", self.storage.delete)(plan.chunks)
        for name in plan.chunks:
            self.writer.known.pop(name.rsplit("/", 1)[-1], None)
        if plan.manifests:
            self._emit("retention", deleted=list(plan.manifests), chunks_deleted=len(plan.chunks))
        self.maybe_sweep_temporaries()

    def maybe_sweep_temporaries(self) -> None:
        """Remove the temporary files of writers killed mid-put, at most once per STALE_TEMP_S.

        No listing shows them and nothing else removes them; they only become stale after STALE_TEMP_S,
        so walking the folders more often than that finds nothing new.
        """
        sweep = getattr(self.storage, "remove_stale_temporaries", None)
        now = self._clock()
        if sweep is not None and (self._swept_at is None or now - self._swept_at >= STALE_TEMP_S):
            self._swept_at = now
            removed = sweep([CHUNK_DIR, MANIFEST_DIR], STALE_TEMP_S)
            if removed:
                self._emit("retention", temporaries_deleted=removed)

    def _still_current(self, term: int) -> bool:
        """Whether the fence still lets `term` write; an event when it does not."""
        if self.fence is None or self.fence(term):
            return True
        self._emit("retention_skipped", term=term, reason="a newer term leads: its writer deletes what is old")
        return False
