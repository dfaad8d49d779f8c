"""One worker thread per target: takes what is pending, plans it, ships it, retries with backoff.

A slow or dead target only ever delays its own worker. While it is down, new changes keep merging
into its :class:`~sidecar.batch.Pending` set (bounded: past the limit it falls back to one full sync);
when it returns everything converges. Failed attempts are retried by tenacity with exponential
backoff and jitter, capped at ``SYNC_RETRY_MAX_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from . import logs
from .batch import MODIFIED, Pending, Snapshot
from .guard import GuardError, SourceGuard
from .metrics import Metrics
from .plan import make_plan, open_for_writing
from .rsync import Outcome, Result, Rsync, Stats, classify, parse_skipped_deletes, parse_stats, skipped_paths
from .ssh import SshError, SshLink
from .targets import Target

__all__ = ["ReportOnce", "TransientError", "Worker", "WorkerSettings"]

log = logs.get("worker")


class TransientError(Exception):
    """A failed attempt worth retrying. ``reason`` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FatalTargetError(Exception):
    """Retrying cannot help (usage error, an option the target refuses); needs the operator."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WorkerSettings:
    """The part of the configuration a worker needs."""

    delete: bool
    max_delete: int
    max_pending: int
    full_interval_s: int  # 0: no periodic full sync
    retry_max_s: int
    write_wait_s: int
    quiet_s: float
    once: bool = False  # one full sync, then the thread ends


class ReportOnce:
    """Remembers which skipped paths were reported, so each is logged once (bounded memory)."""

    def __init__(self, limit: int = 10000) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, path: str, reason: str) -> bool:
        with self._lock:
            if (path, reason) in self._seen:
                return False
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._seen.add((path, reason))
            return True


class Worker(threading.Thread):
    """Replicates to one target.

    Args:
        target: where to.
        source: the source directory.
        link: the persistent ssh connection.
        rsync: rsync command lines for this target.
        guard: source checks made before every sync.
        metrics: where to count.
        settings: behaviour.
        reports: shared "report each skipped path once" memory.
    """

    def __init__(
        self,
        target: Target,
        source: str,
        link: SshLink,
        rsync: Rsync,
        guard: SourceGuard,
        metrics: Metrics,
        settings: WorkerSettings,
        reports: ReportOnce,
    ) -> None:
        super().__init__(name=f"worker {target.name}", daemon=True)
        self.target = target
        self.source = source
        self.link = link
        self.rsync = rsync
        self.guard = guard
        self.metrics = metrics
        self.settings = settings
        self.reports = reports
        self.name_label = target.name
        self._cond = threading.Condition()
        self._pending = Pending(settings.max_pending)
        self._pending.request_full("start")
        self._not_before = 0.0  # busy files: do not re-plan before this (monotonic)
        self._busy_since: dict[str, float] = {}
        self._interrupt = threading.Event()
        self._stopped = False
        self._draining = False
        self._deadline = float("inf")
        self._next_full = float("inf")
        self._probe_ok = True
        # Status, read by /readyz.
        self.initial_done = False
        self.failing: tuple[str, str] | None = None
        self.guard_tripped: str | None = None
        self.fatal: tuple[str, str] | None = None
        self.last_success: float | None = None
        self.result: bool | None = None  # once mode: did the full sync succeed
        self._retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=self._wait,
            stop=self._give_up,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        self._backoff = wait_exponential_jitter(initial=0.5, max=settings.retry_max_s, exp_base=2, jitter=0.5)
        metrics.pending.labels(self.name_label).set(0)
        metrics.guard.labels(self.name_label).set(0)

    # ----- called from other threads -------------------------------------------------------------

    def submit(self, changes: Mapping[str, int], seen_at: float) -> None:
        """Merge a batch of changes from the watcher."""
        with self._cond:
            self._pending.merge(changes, seen_at)
            self._not_before = 0.0
            self._cond.notify()
        self.metrics.pending.labels(self.name_label).set(len(self._pending))

    def request_full(self, reason: str) -> None:
        """Ask for a full sync (reconcile) as soon as possible."""
        with self._cond:
            self._pending.request_full(reason)
            self._cond.notify()

    def drain(self, deadline: float) -> None:
        """Shutdown: deliver what is pending (one more try if failing), then end by ``deadline``."""
        with self._cond:
            self._draining = True
            self._deadline = deadline
            self._cond.notify()
        self._interrupt.set()

    def stop(self) -> None:
        """End now: abort a running transfer."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._interrupt.set()
        self.rsync.abort()

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def full_sync_pending(self) -> bool:
        return self._pending.full_needed

    def status(self) -> dict[str, Any]:
        """This target's part of the /readyz document."""
        state = "ok"
        doc: dict[str, Any] = {"target": self.name_label}
        if self.fatal:
            state, reason, message = "fatal", *self.fatal
        elif self.guard_tripped:
            state, reason, message = "delete_guard", "delete_guard", self.guard_tripped
        elif self.failing:
            state, reason, message = "failing", *self.failing
        elif not self.initial_done:
            state, reason, message = "starting", "", "first full sync not finished"
        else:
            reason = message = ""
        doc.update(
            state=state,
            ready=state == "ok",
            pending=len(self._pending),
            full_sync_pending=self._pending.full_needed,
            last_success=self.last_success,
        )
        if reason or message:
            doc.update(reason=reason, message=message)
        return doc

    @property
    def ready(self) -> bool:
        return self.initial_done and not (self.fatal or self.guard_tripped or self.failing)

    # ----- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: report it as this target's failure rather than die silently
            log.exception("worker stopped by an internal error", extra={"fields": {"target": self.name_label}})
            self.fatal = ("error", f"internal error: {exc}")
        finally:
            self.link.close()

    def _due(self, now: float) -> bool:
        if now >= self._next_full:
            self._pending.request_full("periodic reconcile (SYNC_FULL_SYNC_INTERVAL)")
            self._next_full = float("inf")
        return self._pending.full_needed or (len(self._pending) > 0 and now >= self._not_before)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._stopped:
                        return
                    if self._draining and (now >= self._deadline or not self._pending or self.fatal):
                        return
                    if self.fatal and self.settings.once:
                        return
                    if not self.fatal and self._due(now):
                        break
                    timeout = min(self._next_full, self._not_before if self._pending else float("inf")) - now
                    self._cond.wait(timeout=max(0.001, min(timeout, 3600.0)))
            try:
                self._retrying(self._attempt)
                if self.settings.once:
                    self.result = True
                    return
            except TransientError as exc:
                if self.settings.once:
                    self.result = False
                    log.error(
                        "full sync failed",
                        extra={"fields": {"target": self.name_label, "reason": exc.reason, "error": str(exc)}},
                    )
                    return
                # Gave up because of shutdown; the next start's full sync covers what is left.
            except FatalTargetError as exc:
                self.fatal = (exc.reason, str(exc))
                self.metrics.failures.labels(self.name_label, exc.reason).inc()
                log.error(
                    "target needs the operator; not retrying",
                    extra={"fields": {"target": self.name_label, "reason": exc.reason, "error": str(exc)}},
                )
                if self.settings.once:
                    self.result = False
                    return

    # ----- tenacity hooks ------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        if self._draining:
            return 0.2
        if self.settings.once:
            return min(2.0, self._backoff(state))
        return self._backoff(state)

    def _give_up(self, state: RetryCallState) -> bool:
        if self._stopped or (self._draining and time.monotonic() >= self._deadline):
            return True
        return self.settings.once and state.attempt_number >= 3

    def _sleep(self, seconds: float) -> None:
        if self._draining:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
            time.sleep(seconds)
            return
        self._interrupt.wait(seconds)

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "sync failed; retrying",
            extra={
                "fields": {
                    "target": self.name_label,
                    "reason": getattr(exc, "reason", "error"),
                    "error": str(exc),
                    "attempt": state.attempt_number,
                    "retry_in_s": round(wait, 1),
                    "pending": len(self._pending),
                }
            },
        )

    # ----- one attempt ---------------------------------------------------------------------------

    def _attempt(self) -> None:
        with self._cond:
            snap = self._pending.take()
        if not snap:
            return
        try:
            if snap.full:
                self._full_sync(snap)
            else:
                self._batch(snap)
        except TransientError as exc:
            with self._cond:
                self._pending.restore(snap)
            self.failing = (exc.reason, str(exc))
            self.metrics.failures.labels(self.name_label, exc.reason).inc()
            self.metrics.syncs.labels(self.name_label, "full" if snap.full else "batch", "error").inc()
            raise
        except BaseException:
            with self._cond:
                self._pending.restore(snap)
            raise
        finally:
            self.metrics.pending.labels(self.name_label).set(len(self._pending))

    def _check_source(self) -> None:
        try:
            self.guard.check()
        except GuardError as exc:
            raise TransientError("source_guard", str(exc)) from None

    def _connect(self) -> None:
        try:
            if self.link.ensure():
                log.info("connected", extra={"fields": {"target": self.name_label, "starts": self.link.starts}})
        except SshError as exc:
            raise TransientError(exc.reason, str(exc)) from None

    def _run(self, args: list[str], stdin: bytes = b"") -> tuple[Result, Outcome]:
        self._connect()
        result = self.rsync.run(args, stdin)
        outcome = classify(result.returncode, result.stderr)
        if outcome.kind == "retry":
            raise TransientError(outcome.reason, outcome.message)
        if outcome.kind == "fatal":
            raise FatalTargetError(outcome.reason, outcome.message)
        if outcome.kind == "skipped":
            # Keyed like the planner's reports (relative path, reason), so each path is reported once.
            prefix = self.source.rstrip("/") + "/"
            self._report_skipped(
                [(p[len(prefix) :] if p.startswith(prefix) else p, why) for p, why in skipped_paths(result.stderr)]
            )
        return result, outcome

    def _report_skipped(self, skipped: list[tuple[str, str]]) -> None:
        for path, why in skipped:
            if self.reports.first(path, why):
                log.warning("not replicated", extra={"fields": {"path": path, "why": why}})
                self.metrics.skipped.labels("unreadable" if why == "unreadable" else "special").inc()

    def _trip(self, message: str) -> None:
        if self.guard_tripped != message:
            log.error("DELETE GUARD: deletes refused", extra={"fields": {"target": self.name_label, "why": message}})
        self.guard_tripped = message
        self.metrics.guard.labels(self.name_label).set(1)
        self.metrics.failures.labels(self.name_label, "delete_guard").inc()

    def _clear_guard(self) -> None:
        if self.guard_tripped:
            log.info("delete guard cleared", extra={"fields": {"target": self.name_label}})
        self.guard_tripped = None
        self.metrics.guard.labels(self.name_label).set(0)

    def _succeeded(self, kind: str, stats: Stats, seconds: float, seen_at: float | None, paths: int) -> None:
        if self.failing and kind == "batch":
            # A transfer cut off mid-way can leave rsync's temporary files on the target; a full sync
            # removes them and double-checks that the outage lost nothing.
            with self._cond:
                self._pending.request_full(f"recovered from a failure ({self.failing[0]})")
        self.failing = None
        self.last_success = time.time()
        m, t = self.metrics, self.name_label
        m.syncs.labels(t, kind, "success").inc()
        m.files.labels(t).inc(stats.files)
        m.bytes.labels(t).inc(stats.bytes)
        m.deleted.labels(t).inc(stats.deleted)
        m.last_success.labels(t).set(self.last_success)
        if seen_at is not None:
            m.latency.labels(t).observe(time.monotonic() - seen_at)
        log.info(
            "synced",
            extra={
                "fields": {
                    "target": t,
                    "kind": kind,
                    "paths": paths,
                    "files": stats.files,
                    "deleted": stats.deleted,
                    "bytes": stats.bytes,
                    "ms": round(seconds * 1000),
                    "pending": len(self._pending),
                }
            },
        )

    def _hold_busy(self, busy: list[str], now: float) -> list[str]:
        """Keep files still open for writing back; returns those held too long (sent anyway)."""
        overdue = []
        held = {}
        for path in busy:
            since = self._busy_since.setdefault(path, now)
            if now - since >= self.settings.write_wait_s:
                overdue.append(path)
                self._busy_since.pop(path, None)
                log.warning(
                    "file still open for writing after SYNC_WRITE_WAIT_S; sending it anyway",
                    extra={"fields": {"target": self.name_label, "path": path}},
                )
            else:
                held[path] = MODIFIED
        if held:
            with self._cond:
                self._pending.merge(held, None)
                self._not_before = now + self.settings.quiet_s
        return overdue

    def _probe(self, path: str) -> bool | None:
        busy = open_for_writing(path)
        if busy is None and self._probe_ok:
            self._probe_ok = False
            log.warning(
                "cannot tell whether files are still being written (not their owner, no CAP_LEASE); "
                "a file written slowly may reach the target before it is complete — run as the "
                "uploads' owner uid",
                extra={"fields": {"path": path}},
            )
        return bool(busy)

    def _batch(self, snap: Snapshot) -> None:
        self._check_source()
        now = time.monotonic()
        plan = make_plan(snap.changes, self.source, probe_busy=self._probe, limit=self.settings.max_pending)
        if plan.too_many:
            with self._cond:
                self._pending.request_full("a new directory holds more than SYNC_MAX_PENDING paths")
            return
        self._report_skipped(plan.skipped)
        for path in plan.send:
            self._busy_since.pop(path, None)
        plan.send += self._hold_busy(plan.busy, now)
        deletes = self.settings.delete and bool(plan.delete)
        if deletes and len(plan.delete) > self.settings.max_delete:
            self._trip(
                f"one batch would delete {len(plan.delete)} paths, more than SYNC_MAX_DELETE="
                f"{self.settings.max_delete}; raise it and restart if that is intended"
            )
            deletes = False
        elif deletes and self.guard.is_empty():
            self._trip(f"SYNC_SOURCE {self.source} is empty; its {len(plan.delete)} deletes are refused")
            deletes = False
        if not plan.send and not deletes:
            return
        listed = len(plan.send) + (len(plan.delete) if deletes else 0)
        result, outcome = self._run(self.rsync.batch_args(deletes, self.settings.max_delete), plan.files_from(deletes))
        if outcome.kind == "delete_limit":
            self._trip(f"rsync stopped deleting at SYNC_MAX_DELETE={self.settings.max_delete}")
        if outcome.kind == "vanished":
            # Files vanished between planning and sending: plan them again (they are deletes now).
            with self._cond:
                self._pending.merge(dict.fromkeys(plan.send, MODIFIED), None)
        self._succeeded("batch", parse_stats(result.stdout), result.seconds, snap.seen_at, listed)

    def _full_sync(self, snap: Snapshot) -> None:
        self._check_source()
        log.info("full sync", extra={"fields": {"target": self.name_label, "why": snap.full_reason}})
        delete = self.settings.delete
        # Pass 1 sends everything but deletes nothing; it counts what a delete would remove.
        result, outcome = self._run(self.rsync.full_args(delete, 0))
        seconds = result.seconds
        stats = parse_stats(result.stdout)
        guard_ok = True
        if delete and outcome.kind == "delete_limit":
            count = parse_skipped_deletes(result.stdout + result.stderr) or 0
            if count > self.settings.max_delete:
                self._trip(
                    f"a full sync would delete {count} paths, more than SYNC_MAX_DELETE="
                    f"{self.settings.max_delete}; raise it and restart if that is intended"
                )
                guard_ok = False
            elif self.guard.is_empty():
                self._trip(
                    f"SYNC_SOURCE {self.source} is empty but the target has {count} paths; "
                    "refusing to delete them (is the uploads volume mounted?)"
                )
                guard_ok = False
            else:
                result, outcome = self._run(self.rsync.full_args(True, self.settings.max_delete))
                seconds += result.seconds
                second = parse_stats(result.stdout)
                stats = Stats(stats.files + second.files, stats.bytes + second.bytes, second.deleted)
                if outcome.kind == "delete_limit":
                    self._trip(f"rsync stopped deleting at SYNC_MAX_DELETE={self.settings.max_delete}")
                    guard_ok = False
        if guard_ok:
            self._clear_guard()
        if self.settings.full_interval_s:
            self._next_full = time.monotonic() + self.settings.full_interval_s
        self._succeeded("full", stats, seconds, None, stats.files)
        self.initial_done = True  # after the metrics: /readyz 200 implies the sync is counted
        if self.settings.once and not guard_ok:
            raise FatalTargetError("delete_guard", self.guard_tripped or "delete guard")
