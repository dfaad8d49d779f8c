"""Prometheus metrics, all prefixed ``upsync_``, in a registry of their own (one per daemon run)."""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

__all__ = ["REASONS", "Metrics"]

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
    "usage",
    "delete_guard",
    "source_guard",
    "error",
)


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
        self.ready = Gauge("upsync_ready", "1 when /readyz answers 200.", registry=r)
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

    def forget(self, target: str) -> None:
        """Drop the per-target series of a target that went away (a web node scaled down)."""
        for metric in (self.files, self.bytes, self.deleted, self.pending, self.last_success, self.guard, self.latency):
            with contextlib.suppress(KeyError):
                metric.remove(target)
