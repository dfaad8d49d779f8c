"""Read the source tree without ever following a symlink on the way to a path.

Whoever can write into the uploads (a plugin, a compromised WordPress) can make ``a/b.jpg`` and then swap
the directory ``a`` for a symlink to ``/etc/upsync/ssh``: ``os.lstat("a/b.jpg")`` and any ``open`` would then
reach *outside* the tree, because only the last component of a path is ever left unfollowed. Here every
component is opened on its own, relative to its parent's descriptor, with ``O_NOFOLLOW``: a parent that is a
symlink (or no longer a directory) stops the lookup with :class:`Blocked`, naming that parent.

What remains is the time between this check and rsync's own open of the file; the sender runs in a Landlock
sandbox (:mod:`sidecar.sandbox`) that cannot read outside the source, see docs/security.md.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType

__all__ = ["Blocked", "SafeTree"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
# Directory descriptors kept open during one planning pass (a burst touches a few dozen directories;
# a new tree of thousands is walked depth-first and needs only its current branch).
MAX_OPEN_DIRS = 128


class Blocked(Exception):
    """A parent of the path is a symlink or not a directory: the path does not exist *inside* the tree.

    Attributes:
        parent: that parent, relative to the root.
    """

    def __init__(self, parent: str) -> None:
        super().__init__(f"{parent} is not a directory")
        self.parent = parent


def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


class SafeTree:
    """The source tree for one planning pass: lookups relative to cached directory descriptors.

    Use as a context manager; descriptors are closed at the end.

    Args:
        root: the source directory (a real path: its own ancestors are trusted, they are the operator's).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._fds: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> SafeTree:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _cache(self, rel: str, fd: int) -> int:
        self._fds[rel] = fd
        while len(self._fds) > MAX_OPEN_DIRS:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def dirfd(self, rel: str) -> int:
        """A descriptor of the directory ``rel`` ('' is the root), reached without following symlinks.

        Raises:
            Blocked: a component is a symlink or a file.
            FileNotFoundError: a component is missing.
            OSError: a component cannot be opened (e.g. PermissionError).
        """
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        if not rel:
            return self._cache("", os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        parent, name = _split(rel)
        pfd = self.dirfd(parent)
        try:
            return self._cache(rel, os.open(name, _DIR_FLAGS, dir_fd=pfd))
        except OSError as exc:
            # O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP (or ENOTDIR); on a file, ENOTDIR.
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Blocked(rel) from None
            raise

    def lstat(self, rel: str) -> os.stat_result:
        """``lstat`` of ``rel`` itself; its parents are never followed (see :meth:`dirfd`)."""
        parent, name = _split(rel)
        return os.stat(name, dir_fd=self.dirfd(parent), follow_symlinks=False)

    def readlink(self, rel: str) -> str:
        parent, name = _split(rel)
        return os.readlink(name, dir_fd=self.dirfd(parent))

    def open_file(self, rel: str) -> int:
        """Open a file for reading (a symlink at ``rel`` itself is refused, ``ELOOP``). Caller closes it."""
        parent, name = _split(rel)
        return os.open(name, _FILE_FLAGS, dir_fd=self.dirfd(parent))

    def scandir(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        """``(name, lstat)`` of each entry of directory ``rel``; an entry that vanishes meanwhile is left out."""
        # scandir() duplicates the descriptor itself and rewinds it when done.
        with os.scandir(self.dirfd(rel)) as it:
            entries = [(entry.name, entry) for entry in it]
        for name, entry in entries:
            try:
                yield name, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue

    def exists(self, rel: str) -> bool:
        """``rel`` is there, inside the tree (a symlink counts; a path below a blocked parent does not)."""
        try:
            self.lstat(rel)
        except (FileNotFoundError, Blocked):
            return False
        return True

    def is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(rel).st_mode)
        except (OSError, Blocked):
            return False
