"""Watch the source tree with watchfiles (Rust ``notify``) and hand over batches of changed paths.

A batch is handed over once the tree has been quiet for ``SYNC_QUIET_MS``, and never held longer
than ``SYNC_MAX_DELAY_MS``. Events keep accumulating in the Rust watcher while a batch is being
sent, so nothing that happens meanwhile is lost.

watchfiles cannot report some things, so the watcher asks for a full sync (``on_lost``) when:

* the watcher had to be restarted (an error, a file name that is not UTF-8, the source replaced);
* the watcher was stalled for seconds (a stopped or starved process, a paused VM), or
  more changes arrived within one second than the kernel's inotify queue holds
  (``fs.inotify.max_queued_events``), so it may have overflowed (watchfiles drops the overflow
  notice itself); smaller overflows (a stalled reader) are left to the periodic reconcile;
* a new directory holds a *walk breaker* (an unreadable directory, a symlink to a directory): notify's
  walk of it stops there, so the watch is made again with walks of their own for what it left out
  (``sidecar/roots.py``);
* the watch limit was reached (``fs.inotify.max_user_watches``) and the ``auto`` backend fell back
  to polling. watchfiles places the watches it can and says nothing about the others, so after
  start and after every batch that added paths, the watcher checks with a probe watch of its own
  whether the limit is exhausted.

Full syncs asked for because of watcher errors are spaced at least ``FULL_SYNC_COOLDOWN_S`` apart
(a file name that is not UTF-8 makes watchfiles fail on every access to it): a later request waits,
none is dropped.

Why watchfiles' ``RustNotify`` and not its public :func:`watchfiles.watch`: ``watch()`` makes its Rust
watcher lazily, inside the generator, on the first ``next()``, which returns only after a change or its
timeout. There is then no moment at which the watch is known to be in place, and the first full sync must
start only after it is (a change made in between would be in neither). ``RustNotify`` is made, then the
full sync starts; its ``watch()`` takes the same arguments ``watchfiles.watch()`` passes it, by name here.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchfiles import Change
from watchfiles._rust_notify import RustNotify, WatchfilesRustInternalError

from . import logs
from .batch import ADDED, DELETED, MODIFIED
from .roots import breakers, poll_breaker, watch_roots

__all__ = ["Lost", "Watcher", "overflow_threshold", "watch_limit_reached"]

log = logs.get("watcher")

# RustNotify reports watchfiles' Change values as plain ints (no enum per event: bursts bring 40,000 a second).
_FLAGS = {Change.added.value: ADDED, Change.modified.value: MODIFIED, Change.deleted.value: DELETED}
_TIMEOUT_MS = 1000
FULL_SYNC_COOLDOWN_S = 30.0
_IN_DELETE_SELF = 0x400


class Why(enum.Enum):
    """Why events may have been lost (and the watch has to be made again)."""

    SOURCE_GONE = "the source directory disappeared"
    REPLACED = "the source directory was replaced"
    POLLING = "switched to polling"
    LIMIT = "the inotify watch limit was reached"
    FAILED = "the watcher could not be started"
    ERROR = "watcher error"  # repeats (a name that is not UTF-8 fails every access): throttled
    BREAKER = "a new directory holds what the watcher's walk stops at"  # may repeat (a hostile tree): throttled
    FLAT = "a new directory in a tree polled directory by directory"  # may repeat: throttled


@dataclass(frozen=True)
class Lost:
    """Events may have been lost: ``why``, and the detail for the log."""

    why: Why
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.why.value}: {self.detail}" if self.detail else self.why.value


def _parents(path: str, root: str) -> list[str]:
    """The directories between ``root`` (excluded) and ``path`` (excluded)."""
    out = []
    current = os.path.dirname(path)
    while len(current) > len(root):
        out.append(current)
        current = os.path.dirname(current)
    return out


def _listing_changes(
    before: dict[str, tuple[int, int, int, int]], after: dict[str, tuple[int, int, int, int]]
) -> set[tuple[int, str]]:
    """Two listings' difference, as watchfiles reports changes: {(Change value, path)}."""
    changes = {(Change.added.value, p) for p in after.keys() - before.keys()}
    changes |= {(Change.deleted.value, p) for p in before.keys() - after.keys()}
    changes |= {(Change.modified.value, p) for p, v in after.items() if p in before and before[p] != v}
    return changes


class _Stop(Exception):
    """The watch ended because the watcher was asked to stop."""


_libc = ctypes.CDLL(None, use_errno=True)


def watch_limit_reached(path: str) -> bool:
    """True if this user cannot place one more inotify watch (``ENOSPC``: the watch limit is used up).

    A probe of our own: one inotify instance, one watch on ``path``, closed at once.
    """
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False  # no instance to spare: cannot tell (the instance limit is not the watch limit)
    try:
        wd = _libc.inotify_add_watch(fd, os.fsencode(path), _IN_DELETE_SELF)
        return wd < 0 and ctypes.get_errno() == errno.ENOSPC
    finally:
        os.close(fd)


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
        self._last_full = float("-inf")  # monotonic time of the last full-sync request
        self._deferred: str | None = None  # a request waiting for the cooldown
        self._reported: set[str] = set()  # watcher errors logged already (each bad name once)
        self._prefix = self.root + "/" if self.root != "/" else "/"
        self._flat = False  # polling directory by directory (see sidecar/roots.py)
        self._polled: frozenset[str] = frozenset()  # the directories then polled
        self._unpollable: list[str] = []  # directories then listed by this thread instead (see roots.Roots)

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
        try:
            self._run()
        except Exception as exc:  # a dead watcher must not look like a quiet tree
            log.exception("watcher stopped by an internal error")
            self.error = f"the watcher stopped: {exc}"
            self.on_fatal(self.error)

    def _limit_hit(self, detail: str) -> bool:
        """The watch limit is exhausted: fall back to polling (``auto``) or stop. True: watch again."""
        if self.backend == "auto":
            log.error(
                "inotify watch limit reached (fs.inotify.max_user_watches): some directories are not "
                "watched; falling back to polling, which costs CPU and latency — raise the limit on the host",
                extra={"fields": {"detail": detail, "poll_ms": self.poll_interval_ms}},
            )
            self.polling = True
            return True
        self.error = (
            f"inotify watch limit reached ({detail}); raise fs.inotify.max_user_watches on the host, "
            "or set SYNC_WATCH_BACKEND=auto to fall back to polling"
        )
        self.on_fatal(self.error)
        return False

    def _run(self) -> None:
        lost: Lost | None = None
        while not self._stopping.is_set():
            identity = self._identity()
            if identity is None:
                # The source is gone; the workers' guard reports it. Watch again once it is back.
                lost = lost or Lost(Why.SOURCE_GONE)
                self._stopping.wait(1.0)
                continue
            try:
                lost = self._watch(identity, lost)
            except _Stop:
                return
            except UnicodeError as exc:
                # A watch path watchfiles cannot take (roots.py leaves names that are not UTF-8 out; this is the
                # safety net): never a reason to stop replicating.
                log.error("cannot watch the source; retrying", extra={"fields": {"error": str(exc)}})
                lost = lost or Lost(Why.FAILED, str(exc))
                self._stopping.wait(1.0)
                continue
            except OSError as exc:
                # watchfiles says only in its message that the OS limit of watches was hit at start.
                if "watch limit" in str(exc) and not self.polling:
                    if not self._limit_hit(str(exc)):
                        return
                    lost = lost or Lost(Why.POLLING)
                    continue
                log.error("cannot watch the source; retrying", extra={"fields": {"error": str(exc)}})
                lost = lost or Lost(Why.FAILED, str(exc))
                self._stopping.wait(1.0)
                continue
            except WatchfilesRustInternalError as exc:
                # e.g. a file name that is not UTF-8: watchfiles cannot report it, and drops the batch.
                text = str(exc)
                if text not in self._reported:
                    if len(self._reported) >= 1000:
                        self._reported.clear()
                    self._reported.add(text)
                    log.warning("watcher error; restarting it, a full sync follows", extra={"fields": {"error": text}})
                lost = Lost(Why.ERROR, text)
            if lost is not None and lost.why is Why.LIMIT:
                if not self._limit_hit("a new directory could not be watched"):
                    return
                lost = Lost(Why.POLLING)

    def _ask_full(self, reason: str, throttle: bool = False) -> None:
        """Request a full sync now; a ``throttle``d one waits until the cooldown since the last is over."""
        now = time.monotonic()
        if not throttle or now - self._last_full >= FULL_SYNC_COOLDOWN_S:
            self._last_full = now
            self._deferred = None
            self.on_lost(reason)
        else:
            self._deferred = self._deferred or reason

    def _watch(self, identity: tuple[int, int], lost: Lost | None) -> Lost | None:
        """Watch until the source is replaced (returns why events may be lost) or the watcher stops.

        Raises:
            _Stop: asked to stop.
            OSError: the watch cannot be made (the watch limit, a missing source).
            WatchfilesRustInternalError: watchfiles failed on a change it cannot report.
        """
        roots = watch_roots(self.root)
        # Polling walks every root at every poll: past an unreadable directory it fails each time (and that
        # poll's changes are dropped), through a link to / it walks everything. Then poll each directory alone.
        self._flat = self.polling and roots.breakers > 0
        self._polled = frozenset([*roots.dirs, *roots.unpollable]) - {self.root} if self._flat else frozenset()
        self._unpollable = roots.unpollable if self._flat else []
        if self._flat:
            log.warning(
                "polling a tree that holds unreadable or symlinked directories: polling directory by directory; "
                "a new directory is polled only after the watch is made again (a full sync follows, at most "
                f"one every {FULL_SYNC_COOLDOWN_S:.0f} s)",
                extra={
                    "fields": {
                        "unreadable_dirs": roots.unreadable,
                        "symlinked_dirs": roots.links,
                        "dirs": len(roots.dirs),
                    }
                },
            )
            for directory in roots.unpollable:
                log.warning(
                    "listed by upsync itself, not by the poller: this directory holds a symlink to a directory "
                    "that cannot be read, on which the poller fails (remove the link)",
                    extra={"fields": {"path": directory[len(self._prefix) :] if directory != self.root else "."}},
                )
        elif len(roots.paths) > 1:
            log.info(
                "the source holds directories the watcher's walk stops at; watching what follows them separately",
                extra={
                    "fields": {
                        "unreadable_dirs": roots.unreadable,
                        "symlinked_dirs": roots.links,
                        "walks": len(roots.paths),
                    }
                },
            )
        notify = RustNotify(
            watch_paths=roots.dirs if self._flat else roots.paths,
            debug=False,
            force_polling=self.polling,
            poll_delay_ms=self.poll_interval_ms,
            recursive=not self._flat,
            ignore_permission_denied=True,  # an unreadable directory is the planner's to report, not fatal
        )
        try:
            return self._consume(notify, identity, lost)
        finally:
            notify.close()

    def _consume(self, notify: RustNotify, identity: tuple[int, int], lost: Lost | None) -> Lost | None:
        if not self.polling and watch_limit_reached(self.root):
            return Lost(Why.LIMIT, "watches could not be placed on every directory at start")
        listing = self._list_unpollable()
        listed_at = time.monotonic()
        self.started.set()
        if lost:
            # Ask for the full sync only now that the new watch is in place, so it misses nothing.
            # Watcher errors repeat (every access to a name that is not UTF-8): those are throttled.
            self._ask_full(str(lost), throttle=lost.why in (Why.ERROR, Why.BREAKER, Why.FLAT))
        checked = time.monotonic()
        # A step returns within its timeout plus one batch window; far longer means this process was
        # stopped or starved (SIGSTOP, a paused VM, CPU starvation): the kernel queue may have overflowed.
        stall_s = (_TIMEOUT_MS + self.max_delay_ms) / 1000 + 2.0
        while True:
            called = time.monotonic()
            raw = notify.watch(
                debounce_ms=self.max_delay_ms, step_ms=self.quiet_ms, timeout_ms=_TIMEOUT_MS, stop_event=None
            )
            if time.monotonic() - called > stall_s and not self.polling:
                self._ask_full(f"the watcher was stalled for {time.monotonic() - called:.1f} s; events may be lost")
            root_gone, added, polled_gone = False, [], False
            if self._unpollable and time.monotonic() - listed_at >= self.poll_interval_ms / 1000:
                before, listing, listed_at = listing, self._list_unpollable(), time.monotonic()
                raw = (raw if isinstance(raw, set) else set()) | _listing_changes(before, listing)
            if isinstance(raw, set) and raw:  # else "timeout" (a quiet second), "stop" or "signal": none here
                root_gone, added, polled_gone = self._dispatch(raw)
            if self._stopping.is_set():
                raise _Stop
            if self._deferred and time.monotonic() - self._last_full >= FULL_SYNC_COOLDOWN_S:
                self._ask_full(self._deferred)
            if added and self._flat and (new := self._new_dirs(added)):
                return Lost(Why.FLAT, new[0][len(self._prefix) :])
            if added and self.polling and not self._flat and (found := self._new_breakers(added)):
                log.warning(
                    "polling, and a new directory cannot be listed or a new symlink points to a directory; "
                    "polling directory by directory from now on, a full sync follows",
                    extra={"fields": {"paths": ", ".join(found[:3])}},
                )
                return Lost(Why.FLAT, found[0])
            if polled_gone:
                # notify would report the missing directory, or the link it cannot follow, as deleted at every
                # poll: poll without it (the link's directory is listed by this thread instead).
                return Lost(Why.FLAT, "a polled directory was removed, or a symlink the poller cannot take appeared")
            if added and not self.polling:
                if watch_limit_reached(self.root):
                    return Lost(Why.LIMIT)
                if found := self._new_breakers(added):
                    detail = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
                    log.warning(
                        "a new directory holds what the watcher's walk stops at (an unreadable directory, a symlink "
                        "to a directory); watching again, a full sync follows",
                        extra={"fields": {"paths": detail}},
                    )
                    return Lost(Why.BREAKER, detail)
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
                    return Lost(Why.REPLACED)

    def _list_unpollable(self) -> dict[str, tuple[int, int, int, int]]:
        """What the directories the poller cannot take hold: {path: (inode, size, mtime, ctime)}."""
        found: dict[str, tuple[int, int, int, int]] = {}
        for directory in self._unpollable:
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        found[entry.path] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                continue  # gone or unreadable now: the next watch reports it
        return found

    @staticmethod
    def _new_dirs(added: list[str]) -> list[str]:
        """The directories among ``added`` (absolute paths; a symlink is not one)."""
        found = []
        for path in added:
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                continue  # gone again
        return found

    def _new_breakers(self, added: list[str]) -> list[str]:
        """Walk breakers in the directories among ``added`` (absolute paths), relative to the root. Polling,
        also a new directory that cannot be listed and a new symlink to a directory (the poller walks both at
        every poll; inotify walks neither after the start)."""
        new = self._new_dirs(added)
        tops = set(new)
        found = []
        for path in new:
            if any(parent in tops for parent in _parents(path, self.root)):
                continue  # scanned with its new parent (a tree copied in: each directory once, not per level)
            # A new directory that cannot be listed cuts no walk but its own, in which nothing can be watched.
            found.extend(p[len(self._prefix) :] for p in breakers(path) if p != path or self.polling)
        if self.polling:
            found.extend(p[len(self._prefix) :] for p in added if p not in tops and poll_breaker(p))
        return found

    def _dispatch(self, raw: set[tuple[int, str]]) -> tuple[bool, list[str], bool]:
        """Hand a batch over; returns (the source directory itself was deleted or moved, the paths added, the
        poll watch must be made again: a directory polled on its own is gone, or a symlink the poller cannot take
        is reported as deleted at every poll)."""
        seen_at = time.monotonic()
        changes: dict[str, int] = {}
        prefix, cut = self._prefix, len(self._prefix)
        root_gone = polled_gone = False
        added = []
        for change, path in raw:
            if path.startswith(prefix):
                rel = path[cut:]
                flag = _FLAGS.get(change, MODIFIED)
                if flag == ADDED:
                    added.append(path)
                elif flag == DELETED and self.polling and (path in self._polled or poll_breaker(path)):
                    polled_gone = True
                changes[rel] = changes.get(rel, 0) | flag
            elif path == self.root and change != Change.modified.value:
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
                self._ask_full(f"{burst} changes within a second may have overflowed the kernel's inotify queue")
        return root_gone, added, polled_gone
