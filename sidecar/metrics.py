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

__all__ = ["REASONS", "STATES", "Metrics", "histogram_quantile"]

# A target's state, as /readyz names it; upsync_target_state has one series per state, 1 for the current one.
STATES = ("starting", "ok", "failing", "delete_guard", "fatal")

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

    def forget(self, target: str) -> None:
        """Drop the per-target series of a target that went away (a web node scaled down)."""
        for metric in (self.files, self.bytes, self.deleted, self.pending, self.last_success, self.guard, self.latency):
            with contextlib.suppress(KeyError):
                metric.remove(target)
