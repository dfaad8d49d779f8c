"""The target's disk full: retried, reported (reason ``disk_full`` in /readyz and metrics), converges once freed.

The target directory is a 2 MB tmpfs owned by the target account. Two ways out: the filler that ate the
space is removed, and (for a file bigger than the whole disk) the volume is grown with a remount.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import count_entries, tmpfs
from tests.helpers import Sidecar, assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, ssh target account)"),
]


def fill_up(directory: Path) -> Path:
    """Write a file until the volume is full; returns it."""
    filler = directory / ".filler"
    with contextlib.suppress(OSError), open(filler, "wb") as fh:  # ENOSPC ends the loop (and the close)
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


def disk_full_reported(sidecar: Sidecar, target: str) -> float:
    """Seconds until /readyz names ``disk_full`` for the target and the failure is counted."""
    start = time.monotonic()

    def reported() -> bool:
        code, doc = sidecar.readyz()
        return (
            code == 503
            and doc["targets"][0].get("reason") == "disk_full"
            and sidecar.metric("upsync_failures_total", target=target, reason="disk_full") >= 1
        )

    wait_until(reported, 20, "/readyz and the metrics to report disk_full")
    return time.monotonic() - start


def test_target_disk_full(source: Path, sshd: SshServer, start_synced, record) -> None:
    with tmpfs(sshd.root, "2m", owner=sshd.user):
        sidecar = start_synced()
        name = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
        filler = fill_up(sshd.root)
        for i in range(5):
            (source / f"photo-{i}.jpg").write_bytes(os.urandom(100_000))
        detect_1 = disk_full_reported(sidecar, name)
        message = sidecar.readyz()[1]["targets"][0]["message"]
        retries_before = sidecar.metric("upsync_failures_total", target=name, reason="disk_full")
        wait_until(
            lambda: sidecar.metric("upsync_failures_total", target=name, reason="disk_full") > retries_before,
            10,
            "another attempt (retried, not given up)",
        )
        partial = [p.name for p in sshd.root.iterdir() if p.name.startswith(".") and p != filler]
        freed = time.monotonic()
        filler.unlink()
        assert_converges(source, sshd.root, 20)
        converge_1 = time.monotonic() - freed
        sidecar.wait_ready(10)

        # A file bigger than the whole volume: only more space helps.
        (source / "huge.bin").write_bytes(os.urandom(3_000_000))
        detect_2 = disk_full_reported(sidecar, name)
        grown = time.monotonic()
        subprocess.run(["mount", "-o", "remount,size=8m", str(sshd.root)], check=True)
        assert_converges(source, sshd.root, 20)
        converge_2 = time.monotonic() - grown
        sidecar.wait_ready(10)
        record(
            files_checked=count_entries(source),
            volume="2m tmpfs",
            detect_s=round(detect_1, 1),
            converge_after_filler_removed_s=round(converge_1, 1),
            detect_huge_s=round(detect_2, 1),
            converge_after_remount_s=round(converge_2, 1),
            temp_files_left_while_full=len(partial),
            disk_full_failures=int(sidecar.metric("upsync_failures_total", target=name, reason="disk_full")),
            message=message,
        )
        assert "out of space" in message and "No space left on device" in message
        sidecar.stop()  # its ssh sessions must not keep the mount busy
