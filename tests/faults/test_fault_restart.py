"""The daemon SIGKILLed in the middle of a burst and started again: the restart's full sync converges."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import burst, count_entries, descendants, kill_pids, names
from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]


def test_sigkill_mid_burst_then_restart(source: Path, sshd: SshServer, start_synced, runtime_dir: Path, record) -> None:
    runtime = runtime_dir  # ours alone, so what a SIGKILL leaves behind can be seen (removed with workdir)
    first = start_synced()
    writer = threading.Thread(target=burst, args=(source, 0, 3000), kwargs={"dirs": 20, "pause_every": 100})
    writer.start()
    try:
        wait_until(lambda: len(list(sshd.root.glob("b-*/f*"))) >= 200, 20, "part of the burst on the target")
        # Its children are reparented when it dies: note them now (its ssh master, a running rsync).
        children = descendants(first.proc.pid)
        first.proc.kill()
        first.proc.wait()
        killed_at = time.monotonic()
    finally:
        writer.join()
    # Outside a container nothing reaps them: the ssh master keeps its session open forever, an
    # rsync may still be writing. Count them (reported), then end them as a service manager would.
    orphans = names(children)
    kill_pids(children)
    leftover_runtime = sorted(p.name for p in runtime.iterdir())
    on_target = len(list(sshd.root.glob("b-*/f*")))
    temp_files = [p.name for p in sshd.root.rglob(".*") if p.is_file()]
    for i in range(0, 300, 3):  # changes while no daemon runs: only the restart's full sync can see them
        (source / f"b-{i % 20:02d}/f{i:05d}.bin").unlink()
        (source / f"b-{(i + 1) % 20:02d}/f{i + 1:05d}.bin").write_bytes(b"changed while down")

    started = time.monotonic()
    second = start_synced()
    ready_s = time.monotonic() - started
    converge_s = assert_converges(source, sshd.root, 30) + ready_s
    record(
        files_checked=count_entries(source),
        on_target_at_kill=on_target,
        orphans_after_sigkill=orphans,
        leftover_runtime_dirs=len(leftover_runtime),
        temp_files_left_on_target=len(temp_files),
        down_s=round(started - killed_at, 1),
        ready_s=round(ready_s, 1),
        converge_s=round(converge_s, 1),
    )
    assert "why=start" in second.logs()  # it was the restart's full sync that did it
    second.check_alive()
