"""Changed paths waiting for one target: merged into one set, bounded in size.

The watcher hands every batch to each target's :class:`Pending`. While a target is slow or down its
batches keep merging (a path changed ten times is one entry). Past ``limit`` entries the set is dropped
and replaced by "full sync needed", so memory stays bounded however long the outage lasts.
Not thread-safe by itself: the worker guards it with its lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ADDED", "DELETED", "MODIFIED", "Pending", "Snapshot"]

# Bit flags per path. They only hint (watchfiles labels renames by alternation and can mislabel a
# move into the tree as a delete); what is on disk when the batch is planned decides.
ADDED = 1
MODIFIED = 2
DELETED = 4


@dataclass
class Snapshot:
    """What one sync attempt took out of :class:`Pending`."""

    changes: dict[str, int] = field(default_factory=dict)
    full: bool = False
    full_reason: str = ""
    seen_at: float | None = None  # monotonic time the oldest change in it was seen
    # The watcher batches it holds, exactly as handed over (None: it holds changes of its own, e.g. a retry).
    # Targets holding the same batches hold the same changes, so they can share one plan.
    batches: tuple[int, ...] | None = None
    # A full sync stands in for every change dropped while it was pending: its view of the tree must be newer
    # than the newest of them (monotonic time they were seen; infinity: not known). See SharedScan.get.
    dropped_at: float = float("-inf")
    newest: float = float("-inf")  # when the newest change in it was seen (inf: not known)

    def __bool__(self) -> bool:
        return self.full or bool(self.changes)


class Pending:
    """Merged set of changed paths (relative to the source) plus a "full sync needed" flag.

    Example:
        >>> p = Pending(limit=2)
        >>> p.merge({"a": ADDED}, seen_at=1.0); p.merge({"a": MODIFIED, "b": ADDED}, seen_at=2.0)
        >>> sorted(p.take().changes.items())
        [('a', 3), ('b', 1)]
        >>> p.merge({"c": ADDED, "d": ADDED, "e": ADDED}, seen_at=3.0); p.take().full
        True
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._changes: dict[str, int] = {}
        self._full = False
        self._full_reason = ""
        self._seen_at: float | None = None
        self._batches: set[int] = set()
        self._private = False  # holds changes that are not exactly one watcher batch
        self._newest: float = float("-inf")  # when the newest held change was seen (inf: not known)
        self._dropped_at: float = float("-inf")  # the same for changes dropped for the pending full sync
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._changes)

    @property
    def full_needed(self) -> bool:
        return self._full

    def __bool__(self) -> bool:
        return self._full or bool(self._changes)

    def _note_seen(self, seen_at: float | None) -> None:
        if seen_at is not None and (self._seen_at is None or seen_at < self._seen_at):
            self._seen_at = seen_at

    def merge(self, changes: Mapping[str, int], seen_at: float | None, batch: int | None = None) -> None:
        """Add changes (watcher batch number ``batch``, or None for anything else); falls back to "full sync
        needed" once more than ``limit`` paths wait."""
        self._note_seen(seen_at)
        if not changes:
            return
        seen = float("inf") if seen_at is None else seen_at
        if self._full:
            # A full sync covers every path; keep no per-path state, only how recent what it stands for is.
            self._dropped_at = max(self._dropped_at, seen)
            return
        self._newest = max(self._newest, seen)
        if batch is None:
            self._private = self._private or bool(changes)
        else:
            self._batches.add(batch)
        for path, flags in changes.items():
            self._changes[path] = self._changes.get(path, 0) | flags
        if len(self._changes) > self.limit:
            self.overflows += 1
            self.request_full(f"more than {self.limit} changed paths waiting (SYNC_MAX_PENDING)")

    def request_full(self, reason: str, at: float | None = None) -> None:
        """Ask for a full sync; per-path entries are dropped (the full sync covers them). ``at``: the full sync
        stands for changes seen up to then that reach no target otherwise (events the watcher lost, what an
        operator just did): its view of the tree must be newer (see ``Snapshot.dropped_at``)."""
        if not self._full:
            self._full_reason = reason
        self._full = True
        if self._changes:
            self._dropped_at = max(self._dropped_at, self._newest)
        if at is not None:
            self._dropped_at = max(self._dropped_at, at)
        self._changes = {}

    def take(self) -> Snapshot:
        """Everything pending, leaving the set empty.

        Example:
            >>> p = Pending(limit=10)
            >>> p.merge({"a": ADDED}, seen_at=1.0, batch=7); p.merge({"b": ADDED}, seen_at=2.0, batch=8)
            >>> p.take().batches
            (7, 8)
            >>> p.merge({"a": ADDED}, seen_at=1.0, batch=9); p.merge({"c": ADDED}, seen_at=2.0)  # a retry's
            >>> p.take().batches is None
            True
        """
        batches = tuple(sorted(self._batches)) if self._batches and not self._private else None
        snap = Snapshot(
            self._changes, self._full, self._full_reason, self._seen_at, batches, self._dropped_at, self._newest
        )
        self._changes, self._full, self._full_reason, self._seen_at = {}, False, "", None
        self._batches, self._private = set(), False
        self._newest = self._dropped_at = float("-inf")
        return snap

    def restore(self, snap: Snapshot) -> None:
        """Put back what a failed attempt took; newer changes merged meanwhile are kept. The retry is this
        target's own: it plans again (others keep the shared plan)."""
        if snap.full:
            self.request_full(snap.full_reason)
            self._dropped_at = max(self._dropped_at, snap.dropped_at)
        self.merge(snap.changes, snap.seen_at)
        if snap.changes:  # merge() took the oldest change's time for all of them
            if self._full:
                self._dropped_at = max(self._dropped_at, snap.newest)
            else:
                self._newest = max(self._newest, snap.newest)
