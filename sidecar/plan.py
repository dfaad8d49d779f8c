"""Turn a set of changed paths into one rsync file list: what to send, what to delete, what to hold back.

What is on disk now decides, not the event kinds (they only hint):

* an existing file or symlink is sent;
* an existing directory is sent with everything in it when it is new (files can land in a new
  directory before its watch exists), and skipped when only its metadata changed;
* a missing path is a delete; only its topmost missing ancestor is listed (rsync ``--force``
  removes a directory with its contents);
* a file that is still open for writing is held back (see :func:`open_for_writing`), so the target
  never serves half a file; FIFOs, sockets, devices, unreadable files and symlinks pointing out of
  the tree are skipped and reported.

No rsync recursion is used for batches: every path is listed, so a change never costs a tree walk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .batch import ADDED, DELETED

__all__ = ["Plan", "make_plan", "open_for_writing", "parents"]

BusyProbe = Callable[[str], bool | None]


@dataclass
class Plan:
    """One batch for one target.

    Attributes:
        send: existing paths to send (relative to the source).
        delete: missing paths whose target copy is removed.
        busy: files still open for writing, held back for a later batch.
        skipped: ``(path, reason)`` for paths that are never sent.
        too_many: the plan grew past the limit given to :func:`make_plan`: do a full sync instead.
    """

    send: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    too_many: bool = False

    def files_from(self, deletes: bool = True) -> bytes:
        """The NUL-separated list for ``rsync --from0 --files-from=-``."""
        paths = self.send + (self.delete if deletes else [])
        return b"".join(os.fsencode(p) + b"\0" for p in sorted(paths))

    def __bool__(self) -> bool:
        return bool(self.send or self.delete)


def parents(path: str) -> Iterable[str]:
    """Ancestors of a relative path, nearest first.

    Example:
        >>> list(parents("a/b/c"))
        ['a/b', 'a']
    """
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def open_for_writing(path: str) -> bool | None:
    """Whether any process on this machine has ``path`` open for writing.

    Uses a read lease (``F_SETLEASE``), which the kernel refuses while a writer holds the file open,
    across containers too. Needs the file's owner uid or ``CAP_LEASE``.

    Returns:
        True or False, or None when this process may not take leases on the file (not its owner).

    Raises:
        OSError: the file cannot be opened for reading (unreadable, vanished): rsync could not send it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # closing the fd below releases it
        return False
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        return None  # EACCES (not the owner), EINVAL (file system without leases)
    finally:
        os.close(fd)


def _symlink_escapes(root: str, rel: str) -> bool:
    target = os.readlink(os.path.join(root, rel))
    if target.startswith("/"):
        return True
    depth = rel.count("/")
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class _Planner:
    def __init__(self, root: str, probe: BusyProbe | None, limit: int) -> None:
        self.root = root
        self.probe = probe
        self.limit = limit
        self.plan = Plan()
        self.sent: set[str] = set()
        self.handled: set[str] = set()  # leaves already sent, held back or skipped
        self.deleted: set[str] = set()

    def full(self) -> bool:
        if len(self.sent) + len(self.deleted) > self.limit:
            self.plan.too_many = True
        return self.plan.too_many

    def add_existing(self, rel: str, st: os.stat_result, flags: int) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            # A new directory (or one moved in: watchfiles can label that a delete) is sent whole.
            if flags & (ADDED | DELETED):
                self.add_tree(rel)
            return
        self.add_leaf(rel, mode)

    def add_leaf(self, rel: str, mode: int, path: str = "") -> None:
        if rel in self.handled:
            return
        self.handled.add(rel)
        path = path or f"{self.root}/{rel}"
        if stat.S_ISREG(mode):
            if self.probe is None:
                if not os.access(path, os.R_OK):
                    self.plan.skipped.append((rel, "unreadable"))
                    return
            else:
                try:
                    busy = self.probe(path)  # opens the file: an unreadable one fails here
                except OSError as exc:
                    self.report(rel, exc)
                    return
                if busy:
                    self.plan.busy.append(rel)
                    return
        elif stat.S_ISLNK(mode):
            try:
                if _symlink_escapes(self.root, rel):
                    self.plan.skipped.append((rel, "symlink points outside the source"))
                    return
            except OSError:
                return  # vanished meanwhile: the watcher reports the delete
        elif not stat.S_ISDIR(mode):
            self.plan.skipped.append((rel, "not a regular file, directory or symlink"))
            return
        self.sent.add(rel)
        self.plan.send.append(rel)

    def add_tree(self, rel: str) -> None:
        """A directory and, recursively, everything in it (an explicit list: no rsync recursion)."""
        if rel in self.sent:
            return  # inside a directory walked already
        stack = [rel]
        while stack and not self.full():
            current = stack.pop()
            if current in self.sent:
                continue
            self.sent.add(current)
            self.plan.send.append(current)
            try:
                with os.scandir(f"{self.root}/{current}") as it:
                    entries = list(it)
            except OSError as exc:
                self.report(current, exc)
                continue
            for entry in entries:
                if self.full():
                    return
                child = f"{current}/{entry.name}"
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    self.report(child, exc)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
                else:
                    self.add_leaf(child, st.st_mode, entry.path)

    def report(self, rel: str, exc: OSError) -> None:
        """A path that cannot be read is skipped and said so; one that vanished meanwhile is not news."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # the watcher reports the delete
        why = "unreadable" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or "cannot read")
        self.plan.skipped.append((rel, why))

    def add_missing(self, rel: str) -> None:
        # List the topmost missing ancestor only: deleting it removes everything below.
        top = rel
        for parent in parents(rel):
            if os.path.lexists(os.path.join(self.root, parent)):
                break
            top = parent
        self.deleted.add(top)


def make_plan(
    changes: Mapping[str, int],
    root: str,
    *,
    probe_busy: BusyProbe | None = open_for_writing,
    limit: int = 1_000_000,
) -> Plan:
    """Plan one batch.

    Args:
        changes: relative path -> flags (:data:`~sidecar.batch.ADDED` ...), from :class:`~sidecar.batch.Pending`.
        root: the source directory.
        probe_busy: tells whether a file is still open for writing (None: never hold files back).
        limit: give up (``plan.too_many``) past this many listed paths; a full sync is cheaper then.

    Example:
        >>> import tempfile, pathlib
        >>> root = tempfile.mkdtemp(); pathlib.Path(root, "new").mkdir()
        >>> _ = pathlib.Path(root, "new/f").write_text("x")
        >>> p = make_plan({"new": 1, "gone/x": 4}, root, probe_busy=None)
        >>> p.send, p.delete
        (['new', 'new/f'], ['gone'])
    """
    planner = _Planner(root, probe_busy, limit)
    # Shallow paths first, so a new directory's walk covers the events below it.
    for rel in sorted(changes, key=lambda p: (p.count("/"), p)):
        if planner.full():
            break
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        if rel in planner.handled or rel in planner.sent:
            continue  # inside a new directory walked already
        try:
            st = os.lstat(f"{root}/{rel}")
        except (FileNotFoundError, NotADirectoryError):
            planner.add_missing(rel)
            continue
        except OSError as exc:
            planner.plan.skipped.append((rel, exc.strerror or "cannot stat"))
            continue
        planner.add_existing(rel, st, changes[rel])
    plan = planner.plan
    # A delete under another delete is covered by it.
    plan.delete = sorted(d for d in planner.deleted if not any(p in planner.deleted for p in parents(d)))
    return plan
