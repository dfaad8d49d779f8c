"""Prometheus metrics, all prefixed ``upsync_``, in a registry of their own (one per daemon run)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

__all__ = ["HOOKS", "HOOK_RESULTS", "REASONS", "STATES", "Metrics", "histogram_quantile"]

# A target's state, as /readyz names it; upsync_target_state has one series per state, 1 for the current one.
STATES = ("starting", "ok", "failing", "delete_guard", "fatal")

# The values of the `hook` and `result` labels of upsync_hook_runs_total.
HOOKS = ("command", "webhook")
HOOK_RESULTS = ("ok", "failed", "timeout", "error")

# The fixed set of values of the `reason` label (failures, skips, guard trips).
REASONS = (
    "network",
    "timeout",
    "auth",
    "host_key",
    "busy",
    "partial",
    "disk_full",
    "target_path",
    "rejected",
    "protocol",
    "usage",
    "delete_guard",
    "source_guard",
    "sandbox",
    "error",
)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over ``(upper bound, cumulative count)`` pairs.

    Example:
        >>> histogram_quantile(0.5, [(0.1, 0.0), (0.2, 10.0), (float("inf"), 10.0)])
        0.15
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # beyond the last finite bucket: its bound is the best estimate
            if count == lower_count:
                return bound
            return round(lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count), 6)
        lower_bound, lower_count = bound, count
    return None


class _StateCollector(Collector):
    """``upsync_target_state{target,state}``, read from the workers at scrape time (never stale)."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "upsync_target_state",
            "1 for the state each target is in now (" + ", ".join(STATES) + "), 0 for the others.",
            labels=["target", "state"],
        )
        for target, current in self._states():
            for state in STATES:
                family.add_metric([target, state], 1.0 if state == current else 0.0)
        yield family


class Metrics:
    """Every metric the daemon exports.

    Labels: ``target`` (the target's display name), ``kind`` (``batch`` or ``full``),
    ``status`` (``success`` or ``error``), ``reason`` (one of :data:`REASONS`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.events = Counter("upsync_events", "File system changes reported by the watcher.", registry=r)
        self.watcher_restarts = Counter(
            "upsync_watcher_restarts",
            "Times the watcher was restarted (events may have been lost; a full sync follows).",
            ["reason"],
            registry=r,
        )
        self.syncs = Counter("upsync_syncs", "rsync runs per target.", ["target", "kind", "status"], registry=r)
        self.files = Counter("upsync_files_sent", "Files transferred per target.", ["target"], registry=r)
        self.bytes = Counter("upsync_bytes_sent", "Bytes of file data transferred per target.", ["target"], registry=r)
        self.deleted = Counter("upsync_files_deleted", "Paths deleted on the target.", ["target"], registry=r)
        self.unchanged = Counter(
            "upsync_files_unchanged",
            "Files a batch listed that the target already held as they are (sent by its previous batch, "
            "unchanged since): not sent again.",
            ["target"],
            registry=r,
        )
        self.failures = Counter(
            "upsync_failures", "Failed sync attempts per target and reason.", ["target", "reason"], registry=r
        )
        self.skipped = Counter(
            "upsync_skipped", "Paths never sent (special files, unreadable, unsafe symlinks).", ["reason"], registry=r
        )
        self.pending = Gauge("upsync_pending_paths", "Changed paths waiting per target.", ["target"], registry=r)
        self.last_success = Gauge(
            "upsync_last_success_timestamp_seconds",
            "Unix time of the last successful sync per target.",
            ["target"],
            registry=r,
        )
        # Computed at scrape time (set_readiness), so it is right even when nobody polls /readyz.
        self.plans = Counter(
            "upsync_plans",
            "Batch plans made: one per watcher batch shared by every target, or private (a target that was "
            "behind or retries plans its own).",
            ["kind"],
            registry=r,
        )
        self.ready = Gauge("upsync_ready", "1 when /readyz answers 200.", registry=r)
        self.full_sync_interval = Gauge(
            "upsync_full_sync_interval_seconds",
            "SYNC_FULL_SYNC_INTERVAL: a successful sync is expected at least this often (0: no periodic sync).",
            registry=r,
        )
        Info("upsync_build", "Version and revision of the running upsync.", registry=r).info(
            {"version": __version__, "revision": os.environ.get("UPSYNC_REVISION", "unknown")}
        )
        self.guard = Gauge(
            "upsync_delete_guard_tripped", "1 while the delete guard holds deletes back.", ["target"], registry=r
        )
        self.latency = Histogram(
            "upsync_replication_latency_seconds",
            "From a change being seen by the watcher to it being on the target.",
            ["target"],
            buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )

        self._daytwo(r)

    def _daytwo(self, r: CollectorRegistry) -> None:
        """Hooks (sidecar.hooks) and the progress of full syncs (sidecar.progress)."""
        self.hook_runs = Counter(
            "upsync_hook_runs",
            "Hook command (hook=command) and webhook (hook=webhook) runs per target and result: ok, failed "
            "(non-zero exit, HTTP error, retries exhausted), timeout (killed at SYNC_HOOK_TIMEOUT_S), error "
            "(could not start).",
            ["hook", "target", "result"],
            registry=r,
        )
        self.hook_merged = Counter(
            "upsync_hook_merged",
            "Syncs merged into a hook run already waiting (the hook was busy): one run reports them all.",
            ["hook", "target"],
            registry=r,
        )
        self.hook_everything = Counter(
            "upsync_hook_everything",
            "Hook runs that listed no paths but said `all` (more than SYNC_HOOK_MAX_PATHS, or a webhook body "
            "over SYNC_WEBHOOK_MAX_BYTES).",
            ["hook", "target"],
            registry=r,
        )
        self.hook_duration = Histogram(
            "upsync_hook_duration_seconds",
            "How long a hook run took (a webhook's retries included).",
            ["hook"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.full_running = Gauge(
            "upsync_full_sync_running", "1 while a full sync to the target runs.", ["target"], registry=r
        )
        self.full_files = Gauge(
            "upsync_full_sync_files_sent",
            "Files the running (or last) full sync has sent so far.",
            ["target"],
            registry=r,
        )
        self.full_files_total = Gauge(
            "upsync_full_sync_files_to_send",
            "Files the running (or last) full sync sends in all, from its dry run (NaN: unknown, SYNC_DELETE=false).",
            ["target"],
            registry=r,
        )
        self.full_bytes = Gauge(
            "upsync_full_sync_bytes_sent",
            "Bytes of file data the running (or last) full sync has sent so far.",
            ["target"],
            registry=r,
        )
        self.full_bytes_total = Gauge(
            "upsync_full_sync_bytes_to_send",
            "Bytes the running (or last) full sync sends in all, from its dry run (NaN: unknown).",
            ["target"],
            registry=r,
        )
        self.full_eta = Gauge(
            "upsync_full_sync_eta_seconds",
            "Estimated seconds left in the running full sync (0 when none runs, NaN: unknown).",
            ["target"],
            registry=r,
        )

    def set_readiness(self, ready: Callable[[], bool], states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Compute ``upsync_ready`` and ``upsync_target_state`` at every scrape from these callbacks."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        self.registry.register(_StateCollector(states))

    def latency_quantile(self, target: str, q: float) -> float | None:
        """The ``q`` quantile of a target's replication latency since start, interpolated within the
        histogram's buckets as Prometheus' ``histogram_quantile`` does (None before the first observation)."""
        buckets: list[tuple[float, float]] = []
        for metric in self.latency.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("target") == target:
                    buckets.append((float(sample.labels["le"]), sample.value))
        return histogram_quantile(q, buckets)

    def add(self, target: str) -> None:
        """Make a new target's series that no sync has made yet, at zero. Prometheus' rate() sees nothing in
        a series whose first scrape already holds its first observations: a web node's latency histogram made
        by its first batch gave no p95 until a later one."""
        self.pending.labels(target).set(0)
        self.guard.labels(target).set(0)
        self.latency.labels(target)
        self.unchanged.labels(target)  # made by no full sync: 0 until a batch leaves a file out

    def forget(self, target: str) -> None:
        """Drop the per-target series of a target that went away (a web node scaled down)."""
        for metric in (
            self.files,
            self.bytes,
            self.deleted,
            self.unchanged,
            self.pending,
            self.last_success,
            self.guard,
            self.latency,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(target)
        for gauge in (
            self.full_running,
            self.full_files,
            self.full_files_total,
            self.full_bytes,
            self.full_bytes_total,
            self.full_eta,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(target)
        # Series with more labels than the target: every value they can take (a fixed set), so the series of
        # web nodes that come and go do not pile up in /metrics.
        for kind in ("batch", "full"):
            for status in ("success", "error"):
                with contextlib.suppress(KeyError):
                    self.syncs.remove(target, kind, status)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.failures.remove(target, reason)
        for hook in HOOKS:
            for counter in (self.hook_merged, self.hook_everything):
                with contextlib.suppress(KeyError):
                    counter.remove(hook, target)
            for result in HOOK_RESULTS:
                with contextlib.suppress(KeyError):
                    self.hook_runs.remove(hook, target, result)
