"""The ssh connection killed under load, from either end, while a transfer is in flight.

tests/test_worker.py kills the client-side master three times while small files stream. Here the
files are large enough that an rsync is running at each kill, and the connection is cut alternately
at the client (the daemon's ``ssh -M`` child, found through /proc) and at the server (the sshd
session process serving it). Nothing may be lost, and no rsync temporary file may stay on the target.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import count_entries, descendants, kill_pids, rsync_children, ssh_masters
from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]

KILLS = 6


def server_sessions(sshd: SshServer) -> list[int]:
    """The per-connection processes of this test's sshd (never the listener itself)."""
    assert sshd.proc is not None
    return descendants(sshd.proc.pid)


def test_connection_killed_under_load(source: Path, sshd: SshServer, start_synced, record) -> None:
    sidecar = start_synced()
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    stop = threading.Event()
    written = [0]

    def load() -> None:
        while not stop.is_set() and written[0] < 600:
            d = source / f"load-{written[0] % 10}"
            d.mkdir(exist_ok=True)
            (d / f"{written[0]:04d}.jpg").write_bytes(os.urandom(256 * 1024))
            written[0] += 1
            time.sleep(0.01)

    writer = threading.Thread(target=load)
    writer.start()
    cut: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while len(cut) < KILLS and time.monotonic() < deadline:
            client = len(cut) % 2 == 0
            side = "client ssh -M" if client else "server session"

            def victims(client: bool = client) -> list[int]:
                # Cut only while a transfer runs, so the cut lands in the middle of one.
                if not rsync_children(pid):
                    return []
                return ssh_masters(pid) if client else server_sessions(sshd)

            if kill_pids(wait_until(victims, 20, f"an rsync in flight and a {side}"), signal.SIGKILL):  # type: ignore[arg-type]
                cut.append(side)
            wait_until(lambda: ssh_masters(pid), 20, "a new master connection")
    finally:
        stop.set()
        writer.join()
    started = time.monotonic()
    converge_s = assert_converges(source, sshd.root, 60)
    hidden = [p.name for p in sshd.root.rglob(".*")]
    connects = sidecar.logs().count("INFO    connected ")
    record(
        files_checked=count_entries(source),
        mb_written=round(written[0] * 256 / 1024, 1),
        cuts=cut,
        reconnects=connects - 1,
        failures_network=int(sidecar.metric("upsync_failures_total", reason="network")),
        failures_all=int(sidecar.metric("upsync_failures_total")),
        converge_after_load_s=round(converge_s, 1),
        total_s=round(time.monotonic() - started, 1),
    )
    assert len(cut) == KILLS
    assert connects >= 1 + KILLS // 2, "a new connection after each cut (a server cut may be noticed by the next run)"
    assert not hidden, f"rsync temporary files left on the target: {hidden[:5]}"
    sidecar.wait_ready(20)
