"""The source guard: never let a missing, replaced or emptied source delete the targets' copies.

The device and the mount of ``SYNC_SOURCE`` are recorded at start. Before every sync the source must
still exist, be a directory and sit on that device and that mount: an unmounted volume leaves the
directory underneath behind, on another device, or on the same one for a bind mount of the same
file system (which only the mount ID tells apart). The same volume mounted again gets a new mount ID
(the kernel hands IDs out again only when no one took them meanwhile): a new mount whose root is the very
directory recorded at start (same device, same inode) is accepted. A sync that would delete while the
source is empty is refused as well.

The targets of one batch check within milliseconds of one another: a send may rely on a check that passed
within :data:`RECENT_S` (one ``stat`` and mount-ID read per batch instead of one per target); a delete always
checks afresh.
"""

from __future__ import annotations

import os
import stat
import time

__all__ = ["RECENT_S", "GuardError", "SourceGuard", "mount_id"]

# How old a passed check may be for a send to rely on it (seconds). With 16 targets the checks of one batch
# spread over ~0.1 s of a loaded machine; each is 4 system calls, each a GIL hand-off among the workers.
RECENT_S = 0.1


class GuardError(Exception):
    """The source cannot be trusted right now; the message says why."""


def mount_id(path: str) -> int | None:
    """The kernel's ID of the mount ``path`` is on (``mnt_id`` in /proc/self/fdinfo), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)
    return None


class SourceGuard:
    """Checks on ``SYNC_SOURCE`` made before every sync.

    Args:
        root: the source directory; it must exist when the guard is made.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        st = os.stat(root)
        self.device = st.st_dev
        self.inode = st.st_ino
        self.mount = mount_id(root)
        self._passed = -float("inf")  # monotonic time of the last check that passed

    def check(self, recent_s: float = 0.0) -> None:
        """Raise :class:`GuardError` unless the source is the directory it was at start.

        ``recent_s``: a check that passed this many seconds ago or less stands (0: always check now)."""
        if recent_s > 0 and time.monotonic() - self._passed <= recent_s:
            return
        try:
            self._check()
        except GuardError:
            self._passed = -float("inf")  # a failed check is the one the next send goes by
            raise
        self._passed = time.monotonic()

    def _check(self) -> None:
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise GuardError(
                f"SYNC_SOURCE {self.root} is gone ({exc.strerror}); nothing is sent or deleted until it is back"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise GuardError(f"SYNC_SOURCE {self.root} is no longer a directory; nothing is sent or deleted")
        if st.st_dev != self.device:
            raise GuardError(
                f"SYNC_SOURCE {self.root} is not the mount it was at start (device {self.device} "
                f"is now {st.st_dev}: volume unmounted?); nothing is sent or deleted until it is back"
            )
        now = mount_id(self.root)
        if self.mount is not None and now is not None and now != self.mount:
            if st.st_ino == self.inode:
                # Mounted again (a new mount ID, which the kernel may not give back): the same directory of the
                # same device is the same volume. What lay under the mount point is another inode.
                self.mount = now
                return
            raise GuardError(
                f"SYNC_SOURCE {self.root} is not the mount it was at start (mount {self.mount} is now "
                f"{now}: volume unmounted?); nothing is sent or deleted until it is back"
            )

    def is_empty(self) -> bool:
        """True if the source has no entries at all (checked only before a sync that deletes)."""
        try:
            with os.scandir(self.root) as it:
                return next(it, None) is None
        except OSError:
            return True
