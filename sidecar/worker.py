"""One worker thread per target: takes what is pending, has it planned, ships it, retries with backoff.

A slow or dead target only ever delays its own worker. While it is down, new changes keep merging into its
:class:`~sidecar.batch.Pending` set (bounded: past the limit it falls back to one full sync); when it returns
everything converges. Failed attempts are retried by tenacity with exponential backoff and jitter, capped at
``SYNC_RETRY_MAX_S``.

This module sequences; the decisions are :mod:`sidecar.policy`'s, the rsync runs :mod:`sidecar.transport`'s,
the plans :mod:`sidecar.plan`'s (one per watcher batch, shared by every target).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from . import logs
from .batch import MODIFIED, Pending, Snapshot
from .guard import RECENT_S, GuardError, SourceGuard
from .hooks import Changes, Hooks
from .metrics import Metrics
from .plan import Plan, SharedPlans, parents, sent_whole, unchanged
from .policy import DeleteLimits, FailureStreak, lasting_in_the_way, may_delete, unhealthy
from .progress import FullSyncOutput, FullSyncProgress, matched_bytes, parse_item
from .rsync import Stats, in_the_way, over_delete_limit
from .scan import SharedScan
from .transport import TransferError, Transport

__all__ = ["ReportOnce", "TransientError", "Worker", "WorkerSettings"]

log = logs.get("worker")

# Files still being written are remembered (for SYNC_WRITE_WAIT_S) up to this many; beyond, the oldest go.
MAX_BUSY_REMEMBERED = 10000


class TransientError(Exception):
    """A failed attempt worth retrying. ``reason`` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FatalTargetError(Exception):
    """Retrying cannot help (an option the target refuses, its directory is missing); needs the operator."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WorkerSettings:
    """The part of the configuration a worker needs."""

    delete: bool
    limits: DeleteLimits
    max_pending: int
    full_interval_s: int  # 0: no periodic full sync
    retry_max_s: int
    write_wait_s: int
    quiet_s: float
    unhealthy_after_s: int = 0
    once: bool = False  # one full sync, then the thread ends
    progress_interval_s: int = 30  # SYNC_PROGRESS_INTERVAL_S


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
        transport: the operations on the target.
        plans: one plan per watcher batch, shared by every worker.
        scans: one pre-scan per reconcile round, shared by every worker.
        guard: source checks made before every sync.
        metrics: where to count.
        settings: behaviour.
        reports: shared "report each skipped path once" memory.
        hooks: told what each successful sync sent and deleted (None: no hooks configured).
    """

    def __init__(
        self,
        transport: Transport,
        plans: SharedPlans,
        scans: SharedScan,
        guard: SourceGuard,
        metrics: Metrics,
        settings: WorkerSettings,
        reports: ReportOnce,
        hooks: Hooks | None = None,
    ) -> None:
        super().__init__(name=f"worker {transport.target.name}", daemon=True)
        self.target = transport.target
        self.transport = transport
        self.plans = plans
        self.scans = scans
        self.guard = guard
        self.metrics = metrics
        self.settings = settings
        self.reports = reports
        self.hooks = hooks
        self.progress: FullSyncProgress | None = None  # while a full sync runs
        self._changes: Changes | None = None  # what this attempt sent and deleted, for the hooks
        self.name_label = self.target.name
        self._cond = threading.Condition()
        self._pending = Pending(settings.max_pending)
        self._pending.request_full("start")
        self._not_before = 0.0  # busy files: do not re-plan before this (monotonic)
        self._busy_since: dict[str, float] = {}
        self._streak = FailureStreak()
        self._interrupt = threading.Event()
        self._stopped = False
        self._draining = False
        self._deadline = float("inf")
        self._next_full = float("inf")
        self._approved = 0  # a one-off operator approval for the next full sync
        # Status, read by /readyz, /healthz, status and the metrics.
        self.initial_done = False
        self.failing: tuple[str, str] | None = None
        self.failing_since: float | None = None  # monotonic
        self.guard_tripped: str | None = None
        self.fatal: tuple[str, str] | None = None
        self.last_success: float | None = None
        self.holds: int | None = None  # paths the target holds (from the last full sync, kept up to date)
        # The last batch that reached the target whole and removed nothing, and the ssh connection it went
        # over (SshLink.starts): what the target holds for sure (see plan.unchanged). None after anything else.
        self._delivered: tuple[Plan, int] | None = None
        # The ssh connection (SshLink.starts) the last full sync went over. A batch that had to connect again
        # may have reached a node rebuilt empty (or restored from a backup) behind the same address while
        # nothing failed: that batch is followed by a full sync.
        self._checked_over = 0
        # Paths the last full sync could not place: a directory on the target in their way that it may not delete.
        self._in_the_way: set[str] = set()
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
        metrics.add(self.name_label)

    # ----- called from other threads -------------------------------------------------------------

    def submit(self, changes: Mapping[str, int], seen_at: float, batch: int | None = None) -> None:
        """Merge a batch of changes from the watcher (``batch``: its number, for the shared plan)."""
        with self._cond:
            self._pending.merge(changes, seen_at, batch)
            self._not_before = 0.0
            self._cond.notify()
        self.metrics.pending.labels(self.name_label).set(len(self._pending))

    def request_full(self, reason: str, at: float | None = None) -> None:
        """Ask for a full sync (reconcile) as soon as possible. ``at`` (monotonic): it stands for changes seen
        up to then that no batch carries (events the watcher lost): no scan made before may serve it."""
        with self._cond:
            self._pending.request_full(reason, at)
            self._cond.notify()

    def approve(self, deletes: int) -> None:
        """Let the next full sync delete up to ``deletes`` paths (once), and start it now."""
        with self._cond:
            self._approved = deletes
            self._pending.request_full(f"operator approved up to {deletes} deletes", time.monotonic())
            self._cond.notify()

    def retry_fatal(self, why: str) -> bool:
        """Try a target that needed the operator again (SIGHUP, a passing ``check``). True if it was fatal."""
        with self._cond:
            was = self.fatal is not None
            self.fatal = None
            self._pending.request_full(why)
            self._cond.notify()
        self._interrupt.set()  # cut a backoff short
        return was

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
        self.transport.rsync.abort()

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def full_sync_pending(self) -> bool:
        return self._pending.full_needed

    @property
    def state(self) -> str:
        if self.fatal:
            return "fatal"
        if self.guard_tripped:
            return "delete_guard"
        if self.failing:
            return "failing"
        return "ok" if self.initial_done else "starting"

    def status(self) -> dict[str, Any]:
        """This target's part of the /readyz document (and of ``status``)."""
        state = self.state
        reason = message = ""
        if state == "fatal" and self.fatal:
            reason, message = self.fatal
        elif state == "delete_guard":
            reason, message = "delete_guard", self.guard_tripped or ""
        elif state == "failing" and self.failing:
            reason, message = self.failing
        elif state == "starting":
            message = "first full sync not finished"
        doc: dict[str, Any] = {
            "target": self.name_label,
            "state": state,
            "ready": state == "ok",
            "pending": len(self._pending),
            "full_sync_pending": self._pending.full_needed,
            "last_success": self.last_success,
        }
        if self.failing_since is not None:
            doc["failing_for_s"] = round(time.monotonic() - self.failing_since, 1)
        if self.transport.receiver is not None:
            doc["receiver"] = self.transport.receiver.describe()
        progress = self.progress
        if progress is not None:
            doc["progress"] = progress.snapshot()
        if reason or message:
            doc.update(reason=reason, message=message)
        return doc

    def health_problem(self) -> str:
        """Why this target makes ``/healthz`` fail ('' if it does not)."""
        since = self.failing_since
        failing_for = time.monotonic() - since if since is not None else 0.0
        return unhealthy(self.state, failing_for, self.settings.unhealthy_after_s)

    @property
    def ready(self) -> bool:
        return self.state == "ok"

    # ----- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: report it as this target's failure rather than die silently
            log.exception("worker stopped by an internal error", extra={"fields": {"target": self.name_label}})
            self.fatal = ("error", f"internal error: {exc}")
        finally:
            self.transport.link.close()

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
                    "target needs the operator; not retrying until SIGHUP or a passing check",
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
        self._interrupt.clear()
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
        kind = "full" if snap.full else "batch"
        delivered, self._delivered = self._delivered, None  # kept only by a batch that goes through whole
        if self._changes is None and self.hooks is not None:
            # Kept across failed attempts: what a cut full sync did send is reported with the retry's.
            self._changes = self.hooks.changes()
        try:
            if snap.full:
                self._full_sync(snap)
            else:
                self._batch(snap, delivered)
        except (TransferError, TransientError) as exc:
            with self._cond:
                self._pending.restore(snap)
            if isinstance(exc, TransferError) and exc.fatal:
                self.metrics.syncs.labels(self.name_label, kind, "error").inc()
                raise FatalTargetError(exc.reason, str(exc)) from None
            self._failed(kind, exc.reason, str(exc))
            raise TransientError(exc.reason, str(exc)) from None
        except BaseException:
            with self._cond:
                self._pending.restore(snap)
            raise
        finally:
            self.metrics.pending.labels(self.name_label).set(len(self._pending))

    def _failed(self, kind: str, reason: str, message: str) -> None:
        if self.failing is None:
            self.failing_since = time.monotonic()
        self.failing = (reason, message)
        self.metrics.failures.labels(self.name_label, reason).inc()
        self.metrics.syncs.labels(self.name_label, kind, "error").inc()
        if kind == "batch" and self._streak.failed((reason, message), reason):
            # The same list failed the same way again and again: a lasting receiver-side problem with one of
            # its paths (a directory where a file goes, ...). A full sync plans the whole tree afresh.
            log.warning(
                "the same batch keeps failing; a full sync follows",
                extra={"fields": {"target": self.name_label, "reason": reason, "error": message}},
            )
            with self._cond:
                self._pending.request_full(f"the same batch failed {self._streak.repeats} times ({reason})")

    def _check_source(self, recent_s: float = 0.0) -> None:
        try:
            self.guard.check(recent_s)
        except GuardError as exc:
            raise TransientError("source_guard", str(exc)) from None

    def report_skipped(self, skipped: Iterable[tuple[str, str]]) -> None:
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
        self.failing_since = None
        self._streak.clear()
        self.last_success = time.time()
        m, t = self.metrics, self.name_label
        m.syncs.labels(t, kind, "success").inc()
        m.files.labels(t).inc(stats.files)
        m.bytes.labels(t).inc(stats.bytes)
        m.deleted.labels(t).inc(stats.deleted)
        m.last_success.labels(t).set(self.last_success)
        if seen_at is not None:
            m.latency.labels(t).observe(time.monotonic() - seen_at)
        if self.hooks is not None and self._changes is not None:
            self.hooks.submit(t, self.target.host, kind, self._changes)  # never blocks
            self._changes = None
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

    def _note(self, stdout: str) -> None:
        """Record what an rsync run itemized (sent files, deleted entries), for the hooks."""
        if self._changes is None:
            return
        for line in stdout.splitlines():
            item = parse_item(line.encode("utf-8", "surrogateescape"))
            if item is not None:
                self._changes.add(*item)

    # ----- batches -------------------------------------------------------------------------------

    def _forget_busy(self, plan: Plan) -> None:
        """Files sent, removed or skipped are not "still being written" any more."""
        if not self._busy_since:
            return
        gone = set(plan.send) | set(plan.delete) | set(plan.retract) | {p for p, _ in plan.skipped}
        for path in list(self._busy_since):
            if path in gone or any(a in gone for a in parents(path)):
                del self._busy_since[path]

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
        while len(self._busy_since) > MAX_BUSY_REMEMBERED:
            del self._busy_since[next(iter(self._busy_since))]
        if held:
            with self._cond:
                self._pending.merge(held, None)
                self._not_before = now + self.settings.quiet_s
        return overdue

    def _unchanged(self, plan: Plan, delivered: tuple[Plan, int] | None) -> set[str]:
        """Files of ``plan`` this target holds as they are: sent by its last whole batch, unchanged since."""
        if delivered is None or delivered[1] != self.transport.link.starts:
            return set()  # a new connection may reach a new host (a replaced node)
        return unchanged(plan, delivered[0])

    def _batch(self, snap: Snapshot, delivered: tuple[Plan, int] | None) -> None:
        self._check_source(RECENT_S)  # sends only; _remove checks afresh
        now = time.monotonic()
        plan = self.plans.get(snap.batches, snap.changes)
        if plan.too_many:
            with self._cond:
                self._pending.request_full("a new directory holds more than SYNC_MAX_PENDING paths", snap.newest)
            return
        self.report_skipped(plan.skipped)
        self._forget_busy(plan)
        held = self._unchanged(plan, delivered)
        if held:
            # A burst into a new directory: the directory's walk sent these, their own events came later.
            plan.send = [p for p in plan.send if p not in held]
            self.metrics.unchanged.labels(self.name_label).inc(len(held))
        overdue = self._hold_busy(plan.busy, now)
        plan.send += overdue
        removals = bool(plan.delete or plan.retract) and self.settings.delete
        if not plan.send and not removals:
            self._delivered = delivered  # the target is as it was
            return
        stats, seconds, whole = Stats(), 0.0, True
        if plan.send:
            run = self.transport.send(plan.files_from())
            self._note(run.result.stdout)
            stats, seconds = run.stats, run.result.seconds
            # Overdue files are sent unstamped: rsync's count would then hide a stamped one that vanished.
            whole = run.kind == "ok" and not overdue and sent_whole(plan, run.stats.files)
            blocked = set(in_the_way(run.result.stderr)) if run.kind == "delete_limit" else set()
            # A listed name that went through is in nobody's way any more (removed on the target meanwhile).
            self._in_the_way -= set(plan.send) - blocked
            if run.kind == "delete_limit" and (not blocked or not blocked <= self._in_the_way):
                # A directory on the target is in the way of the file or link that replaced it: removing it
                # (and everything below) is a delete to count and guard, which the full sync does. Not again
                # for a path the last full sync could not clear either (deletes off or refused, or something
                # kept below it): a plugin rewriting that file must not cost a full sync per write.
                with self._cond:
                    self._pending.request_full("a directory on the target is in the way of what replaced it")
            if run.kind == "vanished":
                # Files vanished between planning and sending: plan them again (they are deletes now).
                with self._cond:
                    self._pending.merge(dict.fromkeys(plan.send, MODIFIED), None)
        connection = self.transport.link.starts
        if held and delivered is not None and connection != delivered[1]:
            # The send made a new connection (maybe to a new host): the files left out go too, next time.
            whole = False
            with self._cond:
                self._pending.merge(dict.fromkeys(held, MODIFIED), None)
        if removals:
            removed, took = self._remove(plan)
            stats, seconds = stats + removed, seconds + took
            self._in_the_way -= set(plan.delete) | set(plan.retract)  # nothing is to be placed there any more
        if self.holds is not None:
            self.holds = max(0, self.holds + stats.created - stats.deleted)
        paths = len(plan.send) + (len(plan.delete) + len(plan.retract) if removals else 0)
        if whole and not (plan.delete or plan.retract):
            self._delivered = (Plan(stamps=plan.stamps, settled=plan.settled), connection)  # not the lists
        self._succeeded("batch", stats, seconds, snap.seen_at, paths)
        if self.transport.link.starts != self._checked_over:
            with self._cond:
                self._pending.request_full(
                    f"connected again (connection {self.transport.link.starts}): the target may have been "
                    "replaced or restored"
                )

    def _remove(self, plan: Plan) -> tuple[Stats, float]:
        """Count what the removals would delete on the target, ask the guard, then delete exactly that."""
        count = self.transport.count_removals(plan.delete, plan.retract)
        if count == 0:
            return Stats(), 0.0
        self._check_source()  # right before deleting: the source is still the volume it was
        verdict = may_delete(
            count, self.holds, self.settings.limits, what="a batch", source_empty=self.guard.is_empty()
        )
        if not verdict.allowed:
            self._trip(verdict.why)
            return Stats(), 0.0
        run = self.transport.remove(plan.delete, plan.retract, max_delete=count)
        self._note(run.result.stdout)
        if run.kind == "delete_limit":
            # More appeared below a removed directory since it was counted; what was counted is deleted,
            # the rest waits for a full sync, which counts again.
            with self._cond:
                self._pending.request_full("more to delete than counted")
        return run.stats, run.result.seconds

    # ----- full syncs ----------------------------------------------------------------------------

    def _take_approval(self) -> int:
        with self._cond:
            approved, self._approved = self._approved, 0
        return approved

    def _full_sync(self, snap: Snapshot) -> None:
        self._check_source()
        log.info("full sync", extra={"fields": {"target": self.name_label, "why": snap.full_reason}})
        scan = self.scans.get(newer_than=snap.dropped_at)
        self.report_skipped([(p, "unreadable") for p in scan.unreadable])
        self.report_skipped(scan.retract)
        delete = self.settings.delete
        approved = self._take_approval()
        allowed, refused, seconds, holds = 0, "", 0.0, None
        kept: set[str] = set()  # in the way even of a deleting run: an excluded path below the directory
        if delete:
            # A dry run first: what would the delete remove (everything below a deleted directory counted)?
            count, counted_stuck = self.transport.count_full(scan, delete=True)
            kept = set(counted_stuck)
            # What the target holds now, or what the source holds if that is more (see policy.may_delete).
            holds = max(count.total - count.created + count.deleted, count.total)
            if count.deleted:
                self._check_source()  # right before deleting
                verdict = may_delete(
                    count.deleted,
                    holds,
                    self.settings.limits,
                    what="a full sync",
                    source_empty=self.guard.is_empty(),
                    approved=approved,
                )
                if verdict.allowed:
                    allowed = count.deleted
                    if verdict.used_approval:
                        log.warning(
                            "deleting with the operator's approval",
                            extra={"fields": {"target": self.name_label, "deletes": allowed, "approved": approved}},
                        )
                else:
                    refused = verdict.why
        # Streamed: progress lines (log, gauges, /readyz) and, for the hooks, what was sent and deleted.
        changes = self._changes
        self.progress = FullSyncProgress(
            self.name_label,
            (count.files, count.bytes) if delete else None,
            self.settings.progress_interval_s,
            self.metrics,
        )
        output = FullSyncOutput(self.progress, changes.add if changes is not None else None)
        try:
            run = self.transport.full(scan, delete=allowed > 0, max_delete=allowed, on_output=output.feed)
        finally:
            self.progress.finish()
            self.progress = None
        if self.transport.rsync.resume and (reused := matched_bytes(run.result.stdout)):
            log.info(
                "full sync reused data on the target", extra={"fields": {"target": self.name_label, "bytes": reused}}
            )
        guard_ok = not refused
        if refused:
            self._trip(refused)  # after the sending pass: everything else did reach the target
        seconds += run.result.seconds
        stuck = set(in_the_way(run.result.stderr)) if run.kind == "delete_limit" else set()
        if run.kind == "delete_limit" and allowed and over_delete_limit(run.result.stderr):
            with self._cond:
                self._pending.request_full("more to delete than counted")
        # What stays in the way for a lasting cause is remembered, so later writes of those names do not each
        # cost a full sync; what came into the way after the count is counted again (see policy).
        way = lasting_in_the_way(stuck, kept, delete, bool(refused), allowed > 0)
        if way.recount:
            with self._cond:
                self._pending.request_full("a directory came into the way during the full sync")
        if way.lasting and way.lasting != self._in_the_way:
            log.warning(
                "a directory on the target is in the way of what replaced it in the source and stays: " + way.why,
                extra={
                    "fields": {
                        "target": self.name_label,
                        "paths": ", ".join(sorted(way.lasting)[:3]),
                        "count": len(way.lasting),
                    }
                },
            )
        self._in_the_way = set(way.lasting)
        self.holds = run.stats.total if guard_ok else holds  # after a full sync the target is the source
        self._checked_over = self.transport.link.starts
        if guard_ok:
            self._clear_guard()
        if self.settings.full_interval_s:
            self._next_full = time.monotonic() + self.settings.full_interval_s
        self._succeeded("full", run.stats, seconds, None, run.stats.files)
        self.initial_done = True  # after the metrics: /readyz 200 implies the sync is counted
        if self.settings.once and not guard_ok:
            raise FatalTargetError("delete_guard", self.guard_tripped or "delete guard")
