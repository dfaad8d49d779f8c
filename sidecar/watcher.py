"""Watch the source tree with watchfiles (Rust ``notify``) and hand over batches of changed paths.

A batch is handed over once the tree has been quiet for ``SYNC_QUIET_MS``, and never held longer
than ``SYNC_MAX_DELAY_MS``. Events keep accumulating in the Rust watcher while a batch is being
sent, so nothing that happens meanwhile is lost.

watchfiles cannot report some things, so the watcher asks for a full sync (``on_lost``) when:

* the watcher had to be restarted (an error, a file name that is not UTF-8, the source replaced);
* more changes arrived within one second than the kernel's inotify queue holds
  (``fs.inotify.max_queued_events``), so it may have overflowed (watchfiles drops the overflow
  notice itself); smaller overflows (a stalled reader) are left to the periodic reconcile;
* the watch limit was reached and the ``auto`` backend fell back to polling.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable

from watchfiles._rust_notify import RustNotify, WatchfilesRustInternalError

from . import logs
from .batch import ADDED, DELETED, MODIFIED

__all__ = ["Watcher", "overflow_threshold"]

log = logs.get("watcher")

# watchfiles' Change values -> our flags
_FLAGS = {1: ADDED, 2: MODIFIED, 3: DELETED}
_TIMEOUT_MS = 1000


def overflow_threshold(proc: str = "/proc/sys/fs/inotify/max_queued_events") -> int:
    """Changes per second from which a queue overflow is assumed: the kernel's queue length.

    A lower bound (a quarter, say) turned every 10,000-file burst into an extra full sync.
    """
    try:
        with open(proc, encoding="ascii") as fh:
            queued = int(fh.read().strip())
    except (OSError, ValueError):
        queued = 16384
    return max(64, queued)


class Watcher(threading.Thread):
    """The watcher thread.

    Args:
        root: the source directory (a real path).
        quiet_ms: quiet window before a batch is handed over.
        max_delay_ms: longest a batch is held while changes keep coming.
        backend: ``auto``, ``inotify`` or ``poll``.
        poll_interval_ms: scan interval when polling.
        on_batch: called with ``{relative path: flags}`` and the monotonic time the batch was seen.
        on_lost: called with a reason when events may have been lost (a full sync should follow).
        on_fatal: called with a message when watching is impossible (``inotify`` backend only).
    """

    def __init__(
        self,
        root: str,
        *,
        quiet_ms: int,
        max_delay_ms: int,
        backend: str,
        poll_interval_ms: int,
        on_batch: Callable[[dict[str, int], float], None],
        on_lost: Callable[[str], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        super().__init__(name="watcher", daemon=True)
        self.root = root.rstrip("/") or "/"
        self.quiet_ms = quiet_ms
        self.max_delay_ms = max_delay_ms
        self.backend = backend
        self.poll_interval_ms = poll_interval_ms
        self.on_batch = on_batch
        self.on_lost = on_lost
        self.on_fatal = on_fatal
        self.polling = backend == "poll"
        self.started = threading.Event()  # set once the first watch is in place
        self.error: str | None = None
        self._stopping = threading.Event()
        self._threshold = overflow_threshold()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, changes) of 1 s
        self._prefix = self.root + "/" if self.root != "/" else "/"

    def stop(self) -> None:
        """Stop after handing over what is already seen (returns at once; join to wait)."""
        self._stopping.set()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def run(self) -> None:
        lost: str | None = None
        while not self._stopping.is_set():
            identity = self._identity()
            if identity is None:
                # The source is gone; the workers' guard reports it. Watch again once it is back.
                lost = lost or "the source directory disappeared"
                self._stopping.wait(1.0)
                continue
            try:
                notify = RustNotify([self.root], False, self.polling, self.poll_interval_ms, True, True)
            except OSError as exc:
                if "watch limit" in str(exc) and not self.polling:
                    if self.backend == "auto":
                        log.error(
                            "inotify watch limit reached (fs.inotify.max_user_watches); falling back to "
                            "polling, which costs CPU and latency — raise the limit on the host",
                            extra={"fields": {"error": str(exc), "poll_ms": self.poll_interval_ms}},
                        )
                        self.polling = True
                        lost = lost or "switched to polling"
                        continue
                    self.error = (
                        f"inotify watch limit reached ({exc}); raise fs.inotify.max_user_watches on "
                        "the host, or set SYNC_WATCH_BACKEND=auto to fall back to polling"
                    )
                    self.on_fatal(self.error)
                    return
                log.error("cannot watch the source; retrying", extra={"fields": {"error": str(exc)}})
                lost = lost or f"watcher failed: {exc}"
                self._stopping.wait(1.0)
                continue
            self.started.set()
            try:
                lost = self._watch(notify, identity, lost)
            except WatchfilesRustInternalError as exc:
                # e.g. a file name that is not UTF-8: watchfiles cannot report it, and drops the batch.
                log.warning("watcher error; restarting it, a full sync follows", extra={"fields": {"error": str(exc)}})
                lost = f"watcher error: {exc}"
            finally:
                notify.close()

    def _watch(self, notify: RustNotify, identity: tuple[int, int], lost: str | None) -> str | None:
        """Watch until stopped or the source is replaced; returns why events may have been lost."""
        if lost:
            # Ask for the full sync only now that the new watch is in place, so it misses nothing.
            self.on_lost(lost)
        checked = time.monotonic()
        while True:
            raw = notify.watch(self.max_delay_ms, self.quiet_ms, _TIMEOUT_MS, None)
            root_gone = False
            if isinstance(raw, set) and raw:
                root_gone = self._dispatch(raw)
            if self._stopping.is_set():
                return None
            now = time.monotonic()
            if root_gone or now - checked >= 1.0:
                checked = now
                # A directory deleted and made again often gets the same inode number back, so the
                # event on the root itself is what tells us the watch is on a dead directory.
                if root_gone or self._identity() != identity:
                    log.warning(
                        "the source directory was replaced or unmounted; watching it again",
                        extra={"fields": {"source": self.root}},
                    )
                    return "the source directory was replaced"

    def _dispatch(self, raw: set[tuple[int, str]]) -> bool:
        """Hand a batch over; returns True if the source directory itself was deleted or moved."""
        seen_at = time.monotonic()
        changes: dict[str, int] = {}
        prefix, cut = self._prefix, len(self._prefix)
        root_gone = False
        for change, path in raw:
            if path.startswith(prefix):
                rel = path[cut:]
                changes[rel] = changes.get(rel, 0) | _FLAGS.get(change, MODIFIED)
            elif path == self.root and change != 2:
                root_gone = True
        if changes:
            self.on_batch(changes, seen_at)
        if not self.polling:
            recent = self._recent
            recent.append((seen_at, len(raw)))
            while recent[0][0] < seen_at - 1.0:
                recent.popleft()
            burst = sum(n for _, n in recent)
            if burst >= self._threshold:
                recent.clear()  # one full sync per burst
                self.on_lost(f"{burst} changes within a second may have overflowed the kernel's inotify queue")
        return root_gone
