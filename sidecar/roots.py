"""Where the watcher's recursive walks start, so that every readable directory of the tree gets a watch.

watchfiles' Rust core (the ``notify`` crate, 8.0) places a recursive watch by walking the tree, following
symlinks, and stops the *whole walk* at the first directory it cannot watch. watchfiles, told to ignore
permission errors (it must: one unreadable directory may not stop replication), then says nothing, and
every directory the walk had not reached yet, in directory order, is silently not watched: its changes
wait for the periodic reconcile. Measured here with ten sibling directories and one of them unreadable
(``lost+found`` of an ext4 volume, a plugin's 0700 folder of another owner): one of the other nine was
watched. A symlink to a directory breaks a walk the same way as soon as anything below its target cannot
be watched (a link to ``/`` always does).

So the tree is scanned first (no symlink followed) for such *walk breakers*; the readable siblings of each
breaker, and of each of its ancestors, become walks of their own. One walk's error does not stop another
(watchfiles places each path it is given separately), and every directory is reached by a walk that no
breaker before it can cut: a directory is either in front of every breaker of its walk, or the sibling of
one of a breaker's ancestors, which is a walk of its own. Directories made later are walked by notify as
they appear; :func:`breakers` tells the watcher when such a new directory holds a breaker (then the watch
is made again with the new roots).

Polling (notify's ``PollWatcher``) walks every root at every poll and reports an unreadable directory as an
error each time, which makes watchfiles drop that poll's changes; following a link to ``/`` it would walk
the whole file system every poll. So a polled tree that holds a breaker is polled directory by directory
(``Roots.dirs``, not recursively): nothing is walked, nothing is followed, and a new directory is polled once
the watcher has made its watch again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Roots", "breakers", "poll_breaker", "watch_roots"]


@dataclass(frozen=True)
class Roots:
    """What to watch: ``paths`` (the tree's root first), every directory that can be listed (``dirs``, for
    polling directory by directory), and the walk breakers found."""

    paths: list[str]
    unreadable: int = 0
    links: int = 0
    dirs: list[str] = field(default_factory=list)
    # Directories holding a symlink the poller fails on at every poll (to a directory that cannot be opened:
    # walkdir opens a followed link's target to detect loops; or to nothing it can reach): left out of ``dirs``
    # and listed by the watcher thread instead.
    unpollable: list[str] = field(default_factory=list)
    bad_links: int = 0

    @property
    def breakers(self) -> int:
        """What polling cannot walk recursively: the walk breakers, and symlinks whose target cannot be
        reached (the poller reports a loop as an error and a dangling link as deleted, at every poll)."""
        return self.unreadable + self.links + self.bad_links


def _scan(top: str) -> Iterator[tuple[str, list[str] | None, list[str], list[str]]]:
    """Every real directory below ``top`` (``top`` included), depth first: (directory, its real child
    directories or None if it cannot be listed, its symlinks to directories, its symlinks whose target cannot
    be reached: dangling, a loop, a place that cannot be searched)."""
    stack = [top]
    while stack:
        directory = stack.pop()
        dirs: list[str] = []
        links: list[str] = []
        bad: list[str] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            dirs.append(entry.path)
                            continue
                        if not entry.is_symlink():
                            continue
                    except OSError:
                        continue  # gone meanwhile
                    kind = _link_target(entry.path)
                    if kind == _DIR:
                        links.append(entry.path)
                    elif kind == _UNREACHABLE:
                        bad.append(entry.path)
        except OSError:
            yield directory, None, [], []
            continue
        yield directory, dirs, links, bad
        stack.extend(dirs)


_DIR, _UNREACHABLE, _OTHER = "dir", "unreachable", "other"


def _link_target(path: str) -> str:
    """What a symlink leads to, followed as notify follows it: a directory, nothing it can reach (dangling, a
    loop, a place that cannot be searched), or something else."""
    try:
        target = os.stat(path)
    except OSError:
        return _UNREACHABLE
    return _DIR if stat.S_ISDIR(target.st_mode) else _OTHER


def poll_breaker(path: str) -> bool:
    """Is ``path`` a symlink the poller cannot take: to a directory (walked at every poll), or to nothing it can
    reach (a loop is an error, a dangling link a "deleted" change, at every poll)?"""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    return _link_target(path) != _OTHER


def breakers(top: str) -> list[str]:
    """The walk breakers at or below ``top``: directories that cannot be listed, symlinks to directories."""
    found: list[str] = []
    for directory, dirs, links, _ in _scan(top):
        if dirs is None:
            found.append(directory)
        found.extend(links)
    return found


def watch_roots(root: str) -> Roots:
    """The paths to hand watchfiles (recursively) so that every readable directory below ``root`` is watched.

    Without breakers that is ``[root]`` alone: one walk, as before. Linear in the tree's directories, however
    many breakers it holds.
    """
    root = os.path.normpath(root)
    children: dict[str, list[str]] = {}
    broken: list[str] = []
    unpollable: set[str] = set()
    unreadable = links = bad_links = 0
    for directory, dirs, symlinks, bad in _scan(root):
        if dirs is None:
            if directory == root:
                return Roots([root], dirs=[root])  # nothing can be watched; the watcher reports what watchfiles says
            broken.append(directory)
            unreadable += 1
            continue
        children[directory] = dirs
        broken.extend(symlinks)
        links += len(symlinks)
        bad_links += len(bad)
        if bad or any(not _opens(link) for link in symlinks):
            unpollable.add(directory)
    # For each directory above a breaker, its children on the way to breakers ("chain children").
    chains: dict[str, set[str]] = {}
    for path in broken:
        current = path
        while current != root:
            parent = os.path.dirname(current)
            via = chains.setdefault(parent, set())
            if current in via:
                break  # this chain is recorded from here up
            via.add(current)
            current = parent
    extra: set[str] = set()
    for parent, via in chains.items():
        # One chain child: the walk that reaches this directory reaches it too (every breaker below the
        # directory is in it), so only its siblings need walks of their own. More: any of them may come first
        # in directory order and cut the walk, so each gets a walk of its own.
        kids = children.get(parent, ())
        extra.update(d for d in kids if d in children and (len(via) > 1 or d not in via))
    # watchfiles takes paths as str and cannot hand a name that is not UTF-8 to notify (it would raise); such a
    # directory is reported by the planner and covered by full syncs.
    dirs = [d for d in children if d not in unpollable and _utf8(d)]
    return Roots([root, *sorted(d for d in extra if _utf8(d))], unreadable, links, dirs, sorted(unpollable), bad_links)


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _opens(path: str) -> bool:
    """Can the directory a symlink points to be opened (as the poller's loop check does)?"""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError:
        return False
    return True
