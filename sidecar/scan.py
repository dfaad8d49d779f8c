"""Before a full sync: find what rsync's own walk must not take as it is.

rsync's recursion copies what it finds, with two problems a full sync must avoid:

* an unreadable directory (ext4's root-owned ``lost+found`` on any real volume) is a sender I/O error,
  after which rsync skips *every* deletion of that run: deletes the watcher missed would never be repaired.
  Such directories are kept out of the sync (excluded on both sides: neither sent nor deleted), so the rest
  of the tree converges, deletes included;
* a symlink pointing out of the tree is ignored by the receiver (``--safe-links``) and *stays in the
  sender's list*, so the target's old copy of that name (a regular file replaced by the link) would be
  served forever; a FIFO, socket or device likewise. Those names are hidden from the sender (``H`` rules),
  so the receiver removes its copies.

The walk never follows a symlink (:class:`~sidecar.paths.SafeTree`) and skips excluded directories. One scan
serves every target of a reconcile round (:class:`SharedScan`).
"""

from __future__ import annotations

import errno
import stat
import threading
import time
from dataclasses import dataclass, field

from .filters import Excludes, rule
from .paths import Blocked, SafeTree
from .plan import symlink_escapes

__all__ = ["Scan", "SharedScan", "scan_tree"]


@dataclass
class Scan:
    """What a full sync must treat specially.

    Attributes:
        unreadable: directories that cannot be listed (kept out of the sync).
        retract: symlinks pointing out of the tree and special files (their target copies go).
        entries: entries seen (files, directories, links).
        seconds: how long the walk took.
    """

    unreadable: list[str] = field(default_factory=list)
    retract: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    entries: int = 0
    seconds: float = 0.0

    def rules(self) -> bytes:
        """This sync's own filter rules, NUL-separated, for ``--from0 --filter='merge -'``."""
        rules = [rule("-", p) for p in self.unreadable] + [rule("H", p) for p, _ in self.retract]
        return b"".join(r.encode("utf-8", "surrogateescape") + b"\0" for r in rules)


def scan_tree(root: str, excludes: Excludes) -> Scan:
    """Walk ``root`` once (no symlink followed, excluded directories skipped)."""
    start = time.monotonic()
    scan = Scan()
    with SafeTree(root) as tree:
        stack = [""]
        while stack:
            current = stack.pop()
            try:
                entries = list(tree.scandir(current))
            except (Blocked, FileNotFoundError):
                continue  # changed meanwhile: the watcher reports it
            except OSError as exc:
                if current and exc.errno in (errno.EACCES, errno.EPERM):
                    scan.unreadable.append(current)
                continue
            for name, st in entries:
                rel = f"{current}/{name}" if current else name
                mode = st.st_mode
                if excludes.excluded(rel, stat.S_ISDIR(mode)):
                    continue
                scan.entries += 1
                if stat.S_ISDIR(mode):
                    stack.append(rel)
                elif stat.S_ISLNK(mode):
                    try:
                        if symlink_escapes(rel, tree.readlink(rel)):
                            scan.retract.append((rel, "symlink points outside the source"))
                    except (OSError, Blocked):
                        continue
                elif not stat.S_ISREG(mode):
                    scan.retract.append((rel, "not a regular file, directory or symlink"))
    scan.seconds = time.monotonic() - start
    return scan


class SharedScan:
    """One scan for all the targets whose full syncs start together (a reconcile round, the start).

    Args:
        root: the source.
        excludes: ``SYNC_EXCLUDE``.
        reuse_s: a scan started less than this ago is reused. Changes made since reach the targets by batches,
            unless a target dropped them for its full sync (see :meth:`get`).
    """

    def __init__(self, root: str, excludes: Excludes, reuse_s: float = 5.0) -> None:
        self.root = root
        self.excludes = excludes
        self.reuse_s = reuse_s
        self._lock = threading.Lock()
        self._last: tuple[float, Scan] | None = None
        self.made = 0

    def get(self, newer_than: float = float("-inf")) -> Scan:
        """A scan started after ``newer_than`` (monotonic) and at most ``reuse_s`` old.

        A target's full sync stands in for the changes its worker dropped while the full sync was pending
        (``Snapshot.dropped_at``): a scan made before them could hide a name from the sender that is a
        regular file again (and the receiver would delete it), so it is not reused for that target.
        """
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last[0] > self.reuse_s or self._last[0] < newer_than:
                started = time.monotonic()
                scan = scan_tree(self.root, self.excludes)
                self.made += 1
                self._last = (started, scan)
            return self._last[1]
