"""inotify queue overflow: more events than ``fs.inotify.max_queued_events`` before the daemon reads them.

The queue length is fixed when an inotify instance is created, so the global sysctl is lowered only
while the daemon starts and restored as soon as ``/readyz`` is 200 (other processes on this machine
create instances too). The overflow is made certain by stopping the daemon (SIGSTOP, as a daemon
starved of CPU would be) while a burst is written, then letting it go on (SIGCONT).

watchfiles drops the kernel's overflow notice, so the daemon guesses from the size of what it receives.
After an overflow it receives what fit in the queue, so how many queue events one file costs decides
how many paths arrive: a plain write costs 4 (CREATE, OPEN, MODIFY, CLOSE_WRITE: a quarter of the queue
in paths), a write followed by a chmod (what WordPress' upload handler does) 5, files written in
parallel one MODIFY per chunk more. When the guess misses, only the periodic reconcile
(``SYNC_FULL_SYNC_INTERVAL``) repairs the target. The scenario requires convergence and records detection.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.faultlib import count_entries, log_lines, sysctl
from tests.helpers import Sidecar, assert_converges
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (global sysctl, ssh target account)"),
]

QUEUE_KNOB = "/proc/sys/fs/inotify/max_queued_events"
QUEUE = 512  # the daemon's threshold becomes 512 // 4 = 128 changed paths
RECONCILE_S = 10
DETECTED = "overflowed the kernel's inotify queue"


def plain(source: Path, tag: str, n: int = 2000) -> list[Path]:
    paths = [source / f"d{i % 10}" / f"{tag}-{i:04d}.bin" for i in range(n)]
    for path in paths:
        path.write_bytes(os.urandom(256))
    return paths


def with_chmod(source: Path, tag: str, n: int = 2000) -> list[Path]:
    paths = [source / f"d{i % 10}" / f"{tag}-{i:04d}.jpg" for i in range(n)]
    for path in paths:
        path.write_bytes(os.urandom(256))
        path.chmod(0o644)  # an ATTRIB event more per file, as wp_handle_upload() makes
    return paths


def parallel(source: Path, tag: str, n: int = 400, width: int = 10, chunks: int = 10) -> list[Path]:
    """``width`` files at a time written in interleaved chunks (uploads arriving together)."""
    paths = [source / f"d{i % 10}" / f"{tag}-{i:04d}.bin" for i in range(n)]
    for start in range(0, n, width):
        handles = [open(p, "wb") for p in paths[start : start + width]]  # noqa: SIM115
        try:
            for _ in range(chunks):
                for fh in handles:
                    fh.write(os.urandom(100))
                    fh.flush()  # one MODIFY each, never next to the same file's previous one
        finally:
            for fh in handles:
                fh.close()
    return paths


def stopped_burst(sidecar: Sidecar, write: Callable[[], list[Path]]) -> tuple[list[Path], float]:
    """Write while the daemon is stopped, so the kernel queue overflows for certain."""
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGSTOP)
    try:
        paths = write()
    finally:
        sidecar.proc.send_signal(signal.SIGCONT)
    return paths, time.monotonic()


def start_with_small_queue(start_synced, **env: str) -> tuple[Sidecar, float]:
    started = time.monotonic()
    with sysctl(QUEUE_KNOB, QUEUE) as default:
        sidecar = start_synced(**env)
    lowered_s = time.monotonic() - started
    with open(QUEUE_KNOB, encoding="ascii") as fh:
        assert int(fh.read()) == default  # restored before any burst
    return sidecar, lowered_s


def test_inotify_queue_overflow(source: Path, sshd: SshServer, start_synced, record) -> None:
    for d in range(10):  # existing directories: a new one is walked whole, which would hide the overflow
        (source / f"d{d}").mkdir()
    sidecar, lowered_s = start_with_small_queue(start_synced, SYNC_FULL_SYNC_INTERVAL=str(RECONCILE_S))
    figures: dict[str, object] = {"queue": QUEUE, "sysctl_lowered_s": round(lowered_s, 1)}
    for name, write in (("plain", plain), ("chmod", with_chmod), ("parallel", parallel)):
        seen_before = len(log_lines(sidecar, DETECTED))
        paths, resumed = stopped_burst(sidecar, lambda w=write, n=name: w(source, n))
        # A measurement window, not a readiness wait: what arrives before any reconcile could run.
        time.sleep(2)
        early = sum(1 for p in paths if (sshd.root / p.relative_to(source)).exists())
        assert_converges(source, sshd.root, RECONCILE_S * 2 + 10)
        figures[name] = {
            "files": len(paths),
            "detected": len(log_lines(sidecar, DETECTED)) > seen_before,
            "on_target_after_2s": early,
            "converge_s": round(time.monotonic() - resumed, 1),
        }
    figures["files_checked"] = count_entries(source)
    figures["reconcile_interval_s"] = RECONCILE_S
    record(**figures)
    # Convergence is what is required (detected, or repaired by the reconcile); detection is recorded only,
    # so the scenario holds whatever guess the daemon makes.


# Not strict: when the machine is loaded and the writes keep the daemon stopped for longer than the watcher's
# stall check (3.1 s), that check asks for a full sync and the target converges (XPASS, seen in CI). That is
# the stall check doing its job, not the overflow being detected.
@pytest.mark.xfail(
    strict=False,
    reason="an overflow of a stalled reader is not detected (watchfiles drops the kernel's notice, the daemon "
    "guesses from batch sizes; 2,000 write+chmod uploads deliver 103 paths): only the periodic reconcile "
    "(default 1 h) repairs the target",
)
def test_overflow_of_chmod_uploads_is_detected(source: Path, sshd: SshServer, start_synced, record) -> None:
    for d in range(10):
        (source / f"d{d}").mkdir()
    # No periodic reconcile: what is not detected is not repaired.
    sidecar, _ = start_with_small_queue(start_synced, SYNC_FULL_SYNC_INTERVAL="0")
    paths, _ = stopped_burst(sidecar, lambda: with_chmod(source, "up"))
    try:
        assert_converges(source, sshd.root, 6)
    finally:
        missing = sum(1 for p in paths if not (sshd.root / p.relative_to(source)).exists())
        record(files=len(paths), missing_on_target_after_6s=missing, detected=bool(log_lines(sidecar, DETECTED)))
