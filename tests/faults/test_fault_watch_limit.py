"""The inotify watch limit exhausted: at start (more directories than watches) and later (new directories).

The global ``fs.inotify.max_user_watches`` is never touched (other processes on this machine need it):
the daemon runs in a user namespace of its own whose ``/proc/sys/user/max_inotify_watches`` is lowered
(see ``faultlib.in_user_namespace``). Expected, per the README: ``SYNC_WATCH_BACKEND=auto`` logs an
error naming the limit and falls back to polling; ``inotify`` exits 1 with one line; never silent.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import PrefixedSidecar, count_entries, in_user_namespace, wait_synced
from tests.helpers import Sidecar, assert_converges, wait_until
from tests.sshd import KeyPair, SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user namespaces with a uid map, ssh target account)"),
]

LIMIT_WORDS = re.compile(r"watch limit|max_user_watches|max_inotify_watches", re.IGNORECASE)


@pytest.fixture
def start_limited(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar], runtime_dir: Path
):
    """Start the daemon in a user namespace allowing ``limit`` inotify watches."""

    def start(limit: int, ready: bool = True, **env: str) -> Sidecar:
        env.setdefault("SYNC_RUNTIME_DIR", str(runtime_dir))
        sidecar = PrefixedSidecar(in_user_namespace(limit), source, [sshd], client_key, workdir, **env)
        sidecars.append(sidecar)  # killed after the test whatever happens
        sidecar.start()
        if ready:
            wait_synced(sidecar)
        return sidecar

    return start


def make_dirs(source: Path, prefix: str, n: int, filename: str = "") -> list[Path]:
    dirs = []
    for i in range(n):
        d = source / f"{prefix}{i:03d}"
        d.mkdir()
        if filename:
            (d / filename).write_text(f"{prefix}{i}")
        dirs.append(d)
    return dirs


def limit_lines(sidecar: Sidecar) -> list[str]:
    return [line for line in sidecar.logs().splitlines() if LIMIT_WORDS.search(line)]


def test_limit_at_start_auto_falls_back_to_polling(source: Path, sshd: SshServer, start_limited, record) -> None:
    dirs = make_dirs(source, "d", 150)
    sidecar = start_limited(100, SYNC_WATCH_BACKEND="auto", SYNC_POLL_INTERVAL_MS="200")
    watcher = sidecar.readyz()[1]["watcher"]
    for d in dirs:
        (d / "new.txt").write_text("written after start")
    arrived = 0
    try:
        wait_until(lambda: all((sshd.root / d.name / "new.txt").exists() for d in dirs), 6, "every new file")
    finally:
        arrived = sum((sshd.root / d.name / "new.txt").exists() for d in dirs)
        record(
            directories=len(dirs) + 1,
            limit=100,
            watcher=watcher,
            limit_log_lines=len(limit_lines(sidecar)),
            replicated_within_6s=f"{arrived}/{len(dirs)}",
        )
    assert limit_lines(sidecar), "an error naming the watch limit"
    assert watcher == "polling"
    assert not [line for line in sidecar.logs().splitlines() if "Traceback" in line]


def test_limit_at_start_inotify_backend_exits_1(source: Path, start_limited, record) -> None:
    make_dirs(source, "d", 150)
    sidecar = start_limited(100, ready=False, SYNC_WATCH_BACKEND="inotify")
    assert sidecar.proc is not None
    try:
        wait_until(lambda: sidecar.proc.poll() is not None, 10, "the daemon to exit")  # type: ignore[union-attr]
    finally:
        record(exited=sidecar.proc.poll(), watcher=sidecar.readyz()[1].get("watcher"), limit=100, directories=151)
    assert sidecar.proc.returncode == 1
    errors = [line for line in sidecar.logs().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and LIMIT_WORDS.search(errors[0]), errors
    assert "Traceback" not in sidecar.logs()


def test_limit_hit_later_falls_back_to_polling(source: Path, sshd: SshServer, start_limited, record) -> None:
    make_dirs(source, "old", 20)
    reconcile = 10
    sidecar = start_limited(60, SYNC_FULL_SYNC_INTERVAL=str(reconcile))  # 21 watches in use, 39 left
    new = make_dirs(source, "new", 80, filename="first.txt")  # a new directory is sent whole: these arrive
    assert_converges(source, sshd.root, 15)
    for d in new:  # later changes in directories inotify could not watch: seen by the polling fallback
        (d / "later.txt").write_text("written after the limit was hit")
    written = time.monotonic()
    # A measurement window, not a readiness wait: what the watcher alone delivers.
    time.sleep(2)
    by_events = sum((sshd.root / d.name / "later.txt").exists() for d in new)
    assert_converges(source, sshd.root, reconcile * 2 + 5)
    converge_s = time.monotonic() - written
    record(
        files_checked=count_entries(source),
        limit=60,
        new_directories=len(new),
        later_files_replicated_by_events=f"{by_events}/{len(new)}",
        limit_log_lines=len(limit_lines(sidecar)),
        watcher=sidecar.readyz()[1]["watcher"],
        reconcile_interval_s=reconcile,
        converge_s=round(converge_s, 1),
    )
    assert limit_lines(sidecar), "an error naming the watch limit"
    assert sidecar.readyz()[1]["watcher"] == "polling"


def test_limit_hit_later_is_reported(source: Path, start_limited, record) -> None:
    make_dirs(source, "old", 10)
    sidecar = start_limited(30)
    make_dirs(source, "new", 40, filename="first.txt")
    try:
        wait_until(lambda: limit_lines(sidecar), 5, "a log line naming the watch limit")
    finally:
        record(limit=30, new_directories=40, limit_log_lines=len(limit_lines(sidecar)))
