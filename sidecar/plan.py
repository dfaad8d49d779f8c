"""Turn a set of changed paths into one plan: what to send, what to remove on the targets, what to hold back.

What is on disk now decides, not the event kinds (they only hint):

* an existing file or in-tree symlink is sent;
* an existing directory is sent with everything in it when it is new (files can land in a new directory
  before its watch exists), and skipped when only its metadata changed;
* a missing path is removed on the target; only its topmost missing ancestor is listed (the delete of a
  directory takes what is below);
* a path that must not be on the targets although it is in the source is *retracted*: a symlink pointing out
  of the tree (never followed, never copied: the target's old copy goes, nothing from outside arrives) and a
  FIFO, socket or device;
* a file that is still open for writing is held back (see :func:`open_for_writing`), so the target never
  serves half a file; unreadable files are skipped and reported (neither sent nor removed);
* ``SYNC_EXCLUDE``d paths, and everything below an excluded directory, are neither sent nor removed.

Every lookup goes through :class:`~sidecar.paths.SafeTree`: no symlink is followed on the way to a path. A
path below a parent that became a symlink or a file is planned as that parent. No rsync recursion is used
for batches: every path is listed, so a change never costs a tree walk.

A plan depends only on the source, so one plan serves every target (:class:`SharedPlans`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .batch import ADDED, DELETED
from .filters import Excludes
from .paths import Blocked, SafeTree

__all__ = ["Plan", "Planner", "SharedPlans", "files_from", "make_plan", "open_for_writing", "parents"]

# rsync handles no name longer than this (MAXPATHLEN, the source directory included); it reports some and
# silently drops others, so the planner reports them itself and never lists them.
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096

# Given a SafeTree and a path: True (open for writing), False, or None (cannot tell).
BusyProbe = Callable[[SafeTree, str], "bool | None"]


@dataclass
class Plan:
    """One batch, for every target.

    Attributes:
        send: existing paths to send (relative to the source).
        delete: paths gone from the source, removed on the target (topmost only).
        retract: paths still in the source that must not be on the target (removed there too).
        busy: files still open for writing, held back for a later batch.
        skipped: ``(path, reason)`` for paths that are never sent.
        too_many: the plan grew past its limit: a full sync is cheaper.
    """

    send: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    retract: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    too_many: bool = False

    @property
    def removals(self) -> list[str]:
        """Everything this plan removes on a target."""
        return sorted(self.delete + self.retract)

    def files_from(self) -> bytes:
        """The sends, NUL-separated, for ``rsync --from0 --files-from=-`` (see :func:`files_from`)."""
        return files_from(self.send)

    def __bool__(self) -> bool:
        return bool(self.send or self.delete or self.retract)


def files_from(paths: Iterable[str]) -> bytes:
    """A ``--from0 --files-from`` list. Each entry starts with ``./``: rsync reads an entry that begins with
    ``#`` or ``;`` as a comment, even NUL-separated, so a top-level upload named ``#1.jpg`` was never sent.

    Example:
        >>> files_from(["b", "#a"])
        b'./#a\\x00./b\\x00'
    """
    return b"".join(b"./" + os.fsencode(p) + b"\0" for p in sorted(paths))


def parents(path: str) -> Iterable[str]:
    """Ancestors of a relative path, nearest first.

    Example:
        >>> list(parents("a/b/c"))
        ['a/b', 'a']
    """
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def open_for_writing(tree: SafeTree, rel: str) -> bool | None:
    """Whether any process on this machine has ``rel`` open for writing.

    Uses a read lease (``F_SETLEASE``), which the kernel refuses while a writer holds the file open, across
    containers too. Needs the file's owner uid or ``CAP_LEASE``. A writer opening the file while we hold the
    lease makes the kernel send SIGIO to this process: the daemon ignores SIGIO (its default action kills).

    Returns:
        True or False, or None when this process may not take leases on the file (not its owner).

    Raises:
        OSError: the file cannot be opened for reading (unreadable, vanished): rsync could not send it.
        Blocked: a parent is not a directory.
    """
    fd = tree.open_file(rel)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # closing the fd below releases it
        return False
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        return None  # EACCES (not the owner), EINVAL (file system without leases)
    finally:
        os.close(fd)


def symlink_escapes(rel: str, target: str) -> bool:
    """Does a symlink at ``rel`` with this ``target`` point outside the tree (rsync's ``--safe-links`` test)?

    Example:
        >>> symlink_escapes("a/l", "../b"), symlink_escapes("a/l", "../../b"), symlink_escapes("l", "/etc")
        (False, True, True)
    """
    if target.startswith("/") or not target:
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


class Planner:
    """Plans batches for one source.

    Args:
        root: the source directory.
        excludes: ``SYNC_EXCLUDE``.
        probe: tells whether a file is still open for writing (None: never hold files back).
        limit: give up (``plan.too_many``) past this many listed paths.
    """

    def __init__(
        self, root: str, excludes: Excludes, probe: BusyProbe | None = open_for_writing, limit: int = 1_000_000
    ) -> None:
        self.root = root
        self.excludes = excludes
        self.probe = probe
        self.limit = limit
        self.probe_unsupported = False  # set once a probe answered "cannot tell" (not the files' owner)

    def plan(self, changes: Mapping[str, int]) -> Plan:
        with SafeTree(self.root) as tree:
            return _Pass(self, tree).run(changes)


class _Pass:
    def __init__(self, planner: Planner, tree: SafeTree) -> None:
        self.p = planner
        self.tree = tree
        self.room = PATH_MAX - len(os.fsencode(planner.root)) - 2  # bytes left for a name below the root
        self.plan = Plan()
        self.handled: set[str] = set()  # paths sent, retracted, held back or skipped
        self.deleted: set[str] = set()

    def run(self, changes: Mapping[str, int]) -> Plan:
        # Shallow paths first, so a new directory's walk covers the events below it.
        for rel in sorted(changes, key=lambda p: (p.count("/"), p)):
            if self.full():
                break
            if not rel or rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            if rel not in self.handled:
                self.change(rel, changes[rel])
        plan = self.plan
        # A removal below another removal, or below a path being sent whole, is covered by it.
        covering = set(self.deleted) | set(plan.retract)
        plan.delete = sorted(d for d in self.deleted if not any(a in covering for a in parents(d)))
        plan.retract = sorted(r for r in plan.retract if not any(a in covering for a in parents(r)))
        return plan

    def full(self) -> bool:
        if len(self.handled) + len(self.deleted) > self.p.limit:
            self.plan.too_many = True
        return self.plan.too_many

    def change(self, rel: str, flags: int) -> None:
        try:
            st = self.tree.lstat(rel)
        except FileNotFoundError:
            self.missing(rel)
            return
        except Blocked as exc:
            self.blocked(exc.parent)
            return
        except OSError as exc:
            self.report(rel, exc)
            return
        if self.p.excludes.excluded(rel, stat.S_ISDIR(st.st_mode)):
            return
        if stat.S_ISDIR(st.st_mode):
            # A new directory (or one moved in: watchfiles can label that a delete) is sent whole.
            if flags & (ADDED | DELETED):
                self.walk(rel)
            return
        self.leaf(rel, st.st_mode)

    def blocked(self, parent: str) -> None:
        """A parent became a symlink or a file: that parent is what changed (it replaces the old directory)."""
        if parent in self.handled:
            return
        try:
            st = self.tree.lstat(parent)
        except Blocked as exc:
            self.blocked(exc.parent)
            return
        except FileNotFoundError:
            self.missing(parent)
            return
        except OSError as exc:
            self.report(parent, exc)
            return
        if not self.p.excludes.excluded(parent, stat.S_ISDIR(st.st_mode)):
            self.leaf(parent, st.st_mode)

    def too_long(self, rel: str) -> bool:
        if len(os.fsencode(rel)) < self.room:
            return False
        self.handled.add(rel)
        self.plan.skipped.append((rel, "File name too long"))
        return True

    def leaf(self, rel: str, mode: int) -> None:
        if rel in self.handled:
            return
        if self.too_long(rel):
            return
        self.handled.add(rel)
        if stat.S_ISREG(mode):
            if not self.readable(rel):
                return
        elif stat.S_ISLNK(mode):
            try:
                escapes = symlink_escapes(rel, self.tree.readlink(rel))
            except (OSError, Blocked):
                return  # vanished meanwhile: the watcher reports the delete
            if escapes:
                self.plan.skipped.append((rel, "symlink points outside the source"))
                self.plan.retract.append(rel)
                return
        elif not stat.S_ISDIR(mode):
            self.plan.skipped.append((rel, "not a regular file, directory or symlink"))
            self.plan.retract.append(rel)
            return
        self.plan.send.append(rel)

    def readable(self, rel: str) -> bool:
        """Probe a regular file: held back while being written, skipped if unreadable."""
        probe = self.p.probe
        try:
            if probe is None:
                os.close(self.tree.open_file(rel))  # an unreadable file fails here
                return True
            busy = probe(self.tree, rel)
        except Blocked:
            return False  # raced: the watcher reports the parent's change
        except OSError as exc:
            self.report(rel, exc)
            return False
        if busy is None:
            self.p.probe_unsupported = True
        if busy:
            self.plan.busy.append(rel)
            return False
        return True

    def walk(self, rel: str) -> None:
        """A directory and, recursively, everything in it (an explicit list: no rsync recursion)."""
        stack = [rel]
        while stack and not self.full():
            current = stack.pop()
            if current in self.handled or self.too_long(current):
                continue  # (too long: what is below it is longer still)
            self.handled.add(current)
            self.plan.send.append(current)
            try:
                entries = list(self.tree.scandir(current))
            except Blocked:
                continue  # replaced by a symlink meanwhile: never followed; the watcher reports it
            except OSError as exc:
                self.report(current, exc)
                continue
            for name, st in entries:
                if self.full():
                    return
                child = f"{current}/{name}"
                is_dir = stat.S_ISDIR(st.st_mode)
                if self.p.excludes.excluded(child, is_dir):
                    continue
                if is_dir:
                    stack.append(child)
                else:
                    self.leaf(child, st.st_mode)

    def report(self, rel: str, exc: OSError) -> None:
        """A path that cannot be read is skipped and said so; one that vanished meanwhile is not news."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # the watcher reports the delete
        why = "unreadable" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or "cannot read")
        self.handled.add(rel)
        self.plan.skipped.append((rel, why))

    def missing(self, rel: str) -> None:
        # Remove the topmost missing ancestor only: its delete removes everything below.
        top = rel
        for parent in parents(rel):
            try:
                self.tree.lstat(parent)
                break
            except FileNotFoundError:
                top = parent
            except Blocked as exc:
                self.blocked(exc.parent)  # a file or symlink where a directory was: it replaces the tree
                return
            except OSError as exc:
                self.report(parent, exc)
                return
        # Excluded paths are never removed; a missing one's type is unknown, so either reading counts.
        if self.p.excludes.excluded(top, True) or self.p.excludes.excluded(top, False):
            return
        self.deleted.add(top)


def make_plan(
    changes: Mapping[str, int],
    root: str,
    *,
    probe_busy: BusyProbe | None = open_for_writing,
    limit: int = 1_000_000,
    excludes: Excludes | None = None,
) -> Plan:
    """Plan one batch (see :class:`Planner`).

    Example:
        >>> import tempfile, pathlib
        >>> root = tempfile.mkdtemp(); pathlib.Path(root, "new").mkdir()
        >>> _ = pathlib.Path(root, "new/f").write_text("x")
        >>> p = make_plan({"new": 1, "gone/x": 4}, root, probe_busy=None)
        >>> p.send, p.delete
        (['new', 'new/f'], ['gone'])
    """
    return Planner(root, excludes or Excludes(()), probe_busy, limit).plan(changes)


class SharedPlans:
    """One plan per set of watcher batches, made by the first target that asks and reused by the others.

    A plan reflects the source at the moment it was made; a target that uses it a little later is in the
    same place as one that planned then (every later change arrives in a later batch). Targets that fell
    behind together hold the same merged batches (the same changes) and share their plan too; a target with
    changes of its own (a retry) plans on its own.

    Args:
        planner: makes the plans.
        keep: how many recent batch plans to keep.
    """

    def __init__(self, planner: Planner, keep: int = 64, counted: Callable[[str], None] = lambda _: None) -> None:
        self.planner = planner
        self.keep = keep
        self.counted = counted  # called with "shared" or "private" for each plan made
        self._plans: OrderedDict[tuple[int, ...], tuple[threading.Lock, list[Plan]]] = OrderedDict()
        self._lock = threading.Lock()
        self.made = 0  # plans made (for tests and metrics)

    def get(self, batches: tuple[int, ...] | None, changes: Mapping[str, int]) -> Plan:
        """The plan of the watcher batches ``batches`` (None: a private plan of ``changes``)."""
        if batches is None:
            return self._make(changes, "private")
        with self._lock:
            entry = self._plans.get(batches)
            if entry is None:
                entry = self._plans[batches] = (threading.Lock(), [])
                while len(self._plans) > self.keep:
                    self._plans.popitem(last=False)
        lock, made = entry
        with lock:  # the others wait for the first, instead of planning the same batch again
            if not made:
                made.append(self._make(changes, "shared"))
            return _copy(made[0])

    def _make(self, changes: Mapping[str, int], kind: str) -> Plan:
        self.made += 1
        self.counted(kind)
        return self.planner.plan(changes)


def _copy(plan: Plan) -> Plan:
    """Each target gets its own lists (a worker adds overdue busy files to its sends)."""
    return Plan(
        list(plan.send), list(plan.delete), list(plan.retract), list(plan.busy), list(plan.skipped), plan.too_many
    )
