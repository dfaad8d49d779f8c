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

Each regular file sent is *stamped* (device, inode, size, mtime, ctime, mode). A file a target already holds as
it is, sent by that target's previous batch and with the same stamp now, is not sent again
(:func:`unchanged`): a burst into a new directory is walked in one batch and its files' own events arrive in the
next. That is only sound for a file whose last change came *before* the file system's clock moved on, which is
what ``settled`` records (see :meth:`_Pass.stamp`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .batch import ADDED, DELETED
from .filters import Excludes
from .paths import Blocked, SafeTree

__all__ = [
    "Plan",
    "Planner",
    "SharedPlans",
    "Stamp",
    "files_from",
    "make_plan",
    "open_for_writing",
    "parents",
    "sent_whole",
    "stamp",
    "unchanged",
]

# rsync handles no name longer than this (MAXPATHLEN, the source directory included); it reports some and
# silently drops others, so the planner reports them itself and never lists them.
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096

# Given a SafeTree and a path: True (open for writing), False, or None (cannot tell).
BusyProbe = Callable[[SafeTree, str], "bool | None"]

# What a regular file was when it was planned: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode, packed
# (81 bytes against 300 for a tuple: a 10,000-file burst keeps one per file). Every write, truncate, chmod, chown
# and rename sets the ctime (which no user can set back); a file replaced by another has another inode or a
# newer ctime.
Stamp = bytes
_STAMP = struct.Struct("=QQqqqI")


def stamp(st: os.stat_result) -> Stamp:
    """The :data:`Stamp` of an ``lstat`` result."""
    return _STAMP.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


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
        stamps: each regular file in ``send``, as planned (shared by every target's copy; never changed).
        settled: those of ``stamps`` whose every later change shows in their stamp (shared; never changed).
    """

    send: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    retract: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    too_many: bool = False
    stamps: dict[str, Stamp] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)

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


def unchanged(plan: Plan, delivered: Plan | None) -> set[str]:
    """Files of ``plan`` that the target already holds as they are now.

    ``delivered`` is the target's previous plan, and only if every one of its sends reached the target and it
    removed nothing there (a removal of a directory takes files that a rename can bring back unchanged). A
    file it sent while settled, with the same stamp now, has not changed since the plan read it; rsync read
    it later still, so the target holds what the source holds.

    Example:
        >>> sent = Plan(send=["a", "b"], stamps={"a": b"1", "b": b"1"}, settled={"a", "b"})
        >>> now = Plan(send=["a", "b", "c"], stamps={"a": b"1", "b": b"2", "c": b"1"})
        >>> sorted(unchanged(now, sent)), unchanged(now, None)
        (['a'], set())
    """
    if delivered is None or not delivered.settled:
        return set()
    before, settled = delivered.stamps, delivered.settled
    return {p for p, now in plan.stamps.items() if p in settled and before[p] == now}


def sent_whole(plan: Plan, transferred: int) -> bool:
    """Did rsync send every regular file ``plan`` lists? (``transferred``: its count of regular files sent.)

    Sends run with ``--ignore-missing-args``: a listed file gone before rsync read it (its directory renamed
    away and, maybe, back) is skipped without a word, exit 0. Such a plan did not reach the target whole, and
    must not serve as ``delivered`` for :func:`unchanged`. With ``--ignore-times`` every listed regular file
    is transferred, so a count short of the stamped files listed means one of them was not.

    Example:
        >>> p = Plan(send=["a", "b", "dir", "link"], stamps={"a": b"1", "b": b"1"})
        >>> sent_whole(p, 2), sent_whole(p, 1)
        (True, False)
    """
    stamps = plan.stamps
    return transferred >= sum(1 for p in plan.send if p in stamps)


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
        # The newest ctime seen on each device: the file system's clock (which stamps ctimes) had reached
        # it when it was seen, so every change made later gets that ctime or a newer one.
        self.clock: dict[int, int] = {}
        self._clock_lock = threading.Lock()

    def plan(self, changes: Mapping[str, int]) -> Plan:
        with self._clock_lock:
            clock = dict(self.clock)  # seen before any lstat of this pass: see _Pass.stamp
        with SafeTree(self.root) as tree:
            done = _Pass(self, tree, clock)
            plan = done.run(changes)
        with self._clock_lock:
            for dev, ctime in clock.items():
                if ctime > self.clock.get(dev, -1):
                    self.clock[dev] = ctime
        return plan


class _Pass:
    def __init__(self, planner: Planner, tree: SafeTree, clock: dict[int, int]) -> None:
        self.p = planner
        self.tree = tree
        self.clock = clock
        self.clocked: set[str] = set()  # directories read for the clock in this pass
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
        self.tick(rel.rpartition("/")[0])
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
            self.saw(st)
            # A new directory (or one moved in: watchfiles can label that a delete) is sent whole.
            if flags & (ADDED | DELETED):
                self.walk(rel)
            return
        self.leaf(rel, st)

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
            self.leaf(parent, st)

    def too_long(self, rel: str) -> bool:
        if len(os.fsencode(rel)) < self.room:
            return False
        self.handled.add(rel)
        self.plan.skipped.append((rel, "File name too long"))
        return True

    def tick(self, directory: str) -> None:
        """Read the clock from a directory before the lstat of anything in it: creating, renaming or removing
        an entry sets its ctime, so a burst's directory shows the newest file's creation. (Without it the
        files of a batch, planned in the order they were written, would each only see older ctimes.)"""
        if directory in self.clocked:
            return
        self.clocked.add(directory)
        with contextlib.suppress(OSError, Blocked):  # the lstat that follows says what is wrong
            self.saw(os.fstat(self.tree.dirfd(directory)))

    def saw(self, st: os.stat_result) -> None:
        """The file system's clock had reached ``st``'s ctime when this lstat ran."""
        if st.st_ctime_ns > self.clock.get(st.st_dev, -1):
            self.clock[st.st_dev] = st.st_ctime_ns

    def stamp(self, rel: str, st: os.stat_result) -> None:
        """Stamp a regular file being sent; it is settled if the clock had moved past its ctime before its lstat.

        ``self.clock`` holds only ctimes read before this file's lstat (this pass runs its lstats one after
        the other, and the planner's were copied before the first). So when this file's ctime is older, any
        change after its lstat gets a newer ctime and shows in its stamp. One changed in the same clock tick
        as its lstat could keep its stamp: it is not settled, and is always sent again. (Needs no clock on
        this machine: NFS stamps ctimes by the server's. A clock set back can only repeat a ctime to the
        nanosecond.)
        """
        self.plan.stamps[rel] = stamp(st)
        if st.st_ctime_ns < self.clock.get(st.st_dev, -1):
            self.plan.settled.add(rel)
        self.saw(st)

    def leaf(self, rel: str, st: os.stat_result) -> None:
        mode = st.st_mode
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
        if stat.S_ISREG(mode):
            self.stamp(rel, st)
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
            self.tick(current)
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
                    self.saw(st)
                    stack.append(child)
                else:
                    self.leaf(child, st)

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
        list(plan.send),
        list(plan.delete),
        list(plan.retract),
        list(plan.busy),
        list(plan.skipped),
        plan.too_many,
        plan.stamps,
        plan.settled,
    )
