"""Per-target workers under failure: outages, a killed ssh master, the pending-set bound, retries."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


def burst(source: Path, n: int, dirs: int = 10, size: int = 2048, pause_every: int = 0) -> None:
    for d in range(dirs):
        (source / f"burst-{d:02d}").mkdir(exist_ok=True)
    for i in range(n):
        (source / f"burst-{i % dirs:02d}/f{i:05d}.bin").write_bytes(os.urandom(size))
        if pause_every and i % pause_every == 0:
            time.sleep(0.01)


def test_target_down_during_burst_converges(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    writer = threading.Thread(target=burst, args=(source, 2000), kwargs={"pause_every": 100})
    writer.start()
    wait_until(lambda: any(sshd.root.glob("burst-*/f*")), 10, "the burst to start arriving")
    sshd.stop()  # mid-burst: connections and the server die
    writer.join()
    for i in range(50):  # changes made while the target is down
        (source / f"burst-{i % 10:02d}/f{i:05d}.bin").unlink()
    (source / "while-down.txt").write_text("x")
    wait_until(lambda: sidecar.readyz()[0] == 503, 10, "readyz 503 during the outage")
    sshd.start()
    assert_converges(source, sshd.root, 30)
    sidecar.wait_ready()
    assert sidecar.metric("upsync_failures_total", reason="network") >= 1


def test_killed_master_is_reopened_and_nothing_lost(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    stop = threading.Event()
    count = [0]

    def write() -> None:
        while not stop.is_set() and count[0] < 3000:
            (source / f"load-{count[0]:05d}.txt").write_text(str(count[0]))
            count[0] += 1
            time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        killed: set[int] = set()
        for _ in range(3):  # kill the multiplexing master three times under load
            wait_until(lambda: count[0] > 100, 10, "load")
            masters = wait_until(
                lambda: [p for p in _masters(sidecar.proc.pid) if p not in killed], 15, "a (new) ssh master"
            )
            for pid in masters:
                os.kill(pid, 9)
                killed.add(pid)
    finally:
        stop.set()
        writer.join()
    assert_converges(source, sshd.root, 30)
    assert sidecar.logs().count("connected target") >= 2  # re-connected after the kills


def _masters(parent: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_master(int(p), parent)]


def _is_master(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return False
    return ppid == parent and cmd[0] == b"ssh" and b"-M" in cmd


def test_pending_bound_falls_back_to_one_full_sync(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar(SYNC_MAX_PENDING="100")
    sshd.stop()
    burst(source, 500, dirs=5, size=64)
    wait_until(
        lambda: (
            "SYNC_MAX_PENDING" in str(sidecar.readyz()[1])
            or (sidecar.metric("upsync_pending_paths") == 0 and sidecar.readyz()[0] == 503)
        ),
        15,
        "the fallback to a full sync",
    )
    assert sidecar.metric("upsync_pending_paths") <= 100  # bounded: no per-path state past the limit
    sshd.start()
    assert_converges(source, sshd.root, 30)
    assert "more than 100 changed paths waiting" in sidecar.logs()


def test_a_target_replaced_while_idle_gets_everything(source: Path, sshd: SshServer, run_sidecar) -> None:
    """A node rebuilt empty behind the same address (a new volume, a restored VM) between two uploads.

    No batch fails (nothing changes while it is away), so the recovery full sync never runs; the only sign
    is that the ssh connection had to be made again. The next upload must bring everything back, not only
    itself and not only at the next hourly reconcile.
    """
    for i in range(20):
        (source / f"old-{i:02d}.jpg").write_bytes(os.urandom(512))
    sidecar = run_sidecar()
    assert_converges(source, sshd.root, 10)
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    sshd.stop()
    wait_until(lambda: not _masters(pid), 10, "the ssh master to notice the node is gone")
    for entry in sshd.root.iterdir():  # the replacement starts empty
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    sshd.start()
    (source / "new.jpg").write_bytes(b"after the replacement")
    assert_converges(source, sshd.root, 20)
    full = lambda: sidecar.metric("upsync_syncs_total", kind="full", status="success")  # noqa: E731
    wait_until(lambda: full() == 2, 10, "the start's full sync and the one after the reconnect")
