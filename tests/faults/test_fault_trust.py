"""Trust under fire: an attacker racing the planner, a plugin's log breaking leases, an unreadable directory.

The deterministic cases are in ``tests/test_trust.py``; these three run for seconds against the real daemon, a
real sshd with an ``rrsync -wo`` account, and record what they saw (see docs/faults.md, "Trust").
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import chown_tree, count_entries, user_daemon, wait_synced
from tests.helpers import Sidecar, assert_converges, wait_until
from tests.sshd import SshServer
from tests.test_trust import SECRET, assert_no_secret, exchange, needs_landlock, secret_dir

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@needs_landlock
def test_racing_directory_swaps_never_ship_an_outside_file(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path, record
) -> None:
    # An attacker swapping a directory with a link to the key directory as fast as it can, for 3 s, while
    # files keep arriving in that directory: nothing from outside ever reaches the target.
    outside = secret_dir(workdir)
    sidecar = run_sidecar()
    assert sidecar.proc is not None
    (source / "d").mkdir()
    (source / "swap").symlink_to(outside)
    stop = threading.Event()
    swaps = [0]

    def attacker() -> None:
        deadline = time.monotonic() + 3.0
        while not stop.is_set() and time.monotonic() < deadline:
            exchange(source / "d", source / "swap")
            swaps[0] += 1

    # The real directory, whatever its name later (opened before the swapping starts).
    real = os.open(source / "d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    thread = threading.Thread(target=attacker)
    thread.start()
    i = 0
    try:
        while thread.is_alive():
            for name in ("id_ed25519", "held.bin", f"f{i}.txt"):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=real)
                os.write(fd, f"upload {i}".encode())
                os.close(fd)
            i += 1
    finally:
        os.close(real)
    thread.join()
    stop.set()
    if (source / "d").is_symlink():
        exchange(source / "d", source / "swap")
    (source / "settled.txt").write_text("x")
    # Thousands of renames a second can overflow the kernel's inotify queue, whose notice watchfiles drops
    # (docs/faults.md, "inotify queue overflow"): the reconcile repairs that; SIGHUP runs it now.
    sidecar.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: (sshd.root / "settled.txt").exists(), 60, "the daemon to keep up")
    assert swaps[0] > 100 and i > 10
    assert_no_secret(sshd.root)
    record(swaps=swaps[0], uploads_written=i * 3, files_on_target=count_entries(sshd.root), secret_shipped=False)
    assert (outside / "id_ed25519").read_bytes() == SECRET


def test_sigio_from_a_broken_lease_does_not_kill_the_daemon(source: Path, sshd: SshServer, run_sidecar, record) -> None:
    # Regression: a writer opening a file while the busy-file probe held its read lease made the kernel send
    # SIGIO, whose default action killed the sidecar (exit 157). The signal itself, deterministically:
    sidecar = run_sidecar()
    assert sidecar.proc is not None
    os.kill(sidecar.proc.pid, signal.SIGIO)
    # ... and the way a plugin does it: appending to a log in the uploads, as fast as it can, for 3 s.
    deadline = time.monotonic() + 3.0
    n = 0
    while time.monotonic() < deadline:
        with open(source / "plugin.log", "a") as fh:
            fh.write(f"line {n}\n")
        n += 1
    sidecar.check_alive()
    converge_s = assert_converges(source, sshd.root, 15)
    sidecar.check_alive()
    record(appends=n, converge_s=round(converge_s, 1), alive=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid: root reads everything)")
def test_an_unreadable_directory_does_not_stop_full_syncs_from_deleting(
    source: Path, sshd: SshServer, client_key, workdir: Path, sidecars: list[Sidecar], record
) -> None:
    # Regression: ext4's root-owned lost+found made rsync skip every deletion of every full sync ("IO error
    # encountered -- skipping file deletion"); the count pass exited 23, not 25, and nothing was deleted ever.
    (source / "lost+found").mkdir(mode=0o700)
    (source / "kept.jpg").write_text("kept")
    (sshd.root / "lost+found").mkdir()
    (sshd.root / "lost+found/untouched").write_text("neither sent nor deleted")
    (sshd.root / "missed-delete.jpg").write_text("deleted while nobody watched")
    sidecar = user_daemon(source, sshd, client_key, workdir, sidecars, SYNC_FULL_SYNC_INTERVAL="2")
    shutil.chown(source / "lost+found", "root", "root")  # stays root's: unreadable for the daemon
    sidecar.start()
    wait_synced(sidecar)
    assert not (sshd.root / "missed-delete.jpg").exists()  # the start's full sync deleted it
    assert (sshd.root / "lost+found/untouched").exists()
    # The periodic reconcile repairs a delete the watcher never saw (made on the target's side here).
    (sshd.root / "stray.jpg").write_text("x")
    start = time.monotonic()
    wait_until(lambda: not (sshd.root / "stray.jpg").exists(), 15, "the reconcile to delete a stray file")
    repaired_s = time.monotonic() - start
    assert (sshd.root / "lost+found/untouched").exists() and (sshd.root / "kept.jpg").exists()
    reports = sum("lost+found" in ln and "not replicated" in ln for ln in sidecar.logs().splitlines())
    assert reports == 1
    full = sum(1 for ln in sidecar.logs().splitlines() if " synced " in ln and "kind=full" in ln)
    record(full_syncs=full, stray_deleted_by_reconcile_s=round(repaired_s, 1), lost_found_reports=reports)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid: root reads everything)")
@pytest.mark.parametrize("backend", ["inotify", "poll"])
def test_unreadable_and_symlinked_directories_do_not_blind_the_watcher(
    source: Path, sshd: SshServer, client_key, workdir: Path, sidecars: list[Sidecar], record, backend: str
) -> None:
    # Regression (inotify): notify (watchfiles' core) stops its whole recursive walk at the first directory it
    # cannot watch, and watchfiles, told to ignore permission errors, says nothing. With ext4's lost+found early
    # in directory order, 8 of 9 sibling directories got no watch: their uploads waited for the reconcile.
    # Regression (poll): notify's poller reported the unreadable directory as an error at every poll, and
    # watchfiles dropped that poll's changes with it; only the throttled full syncs of the restarts replicated.
    dirs = ["", *(f"d{i}" for i in range(10)), *(f"d{i}/deep" for i in range(10))]
    for d in dirs:
        (source / d).mkdir(parents=True, exist_ok=True)
    (source / "lost+found").mkdir(mode=0o700)
    (source / "d3/private").mkdir(mode=0o700)  # a plugin's folder of another owner
    (source / "d5/home").symlink_to("/root")  # a symlink to a directory the daemon cannot read
    # No periodic reconcile: only the watcher can deliver what follows.
    sidecar = user_daemon(
        source,
        sshd,
        client_key,
        workdir,
        sidecars,
        SYNC_FULL_SYNC_INTERVAL="0",
        SYNC_WATCH_BACKEND=backend,
        SYNC_POLL_INTERVAL_MS="200",
    )
    for private in ("lost+found", "d3/private"):
        shutil.chown(source / private, "root", "root")
    sidecar.start()
    wait_synced(sidecar)
    start = time.monotonic()
    for d in dirs:
        (source / d / "probe.jpg").write_text(f"uploaded into /{d}")
    wait_until(lambda: all((sshd.root / d / "probe.jpg").exists() for d in dirs), 15, "an upload into every folder")
    if backend == "poll":
        # d5 holds the link to /root, on which the poller fails: the daemon lists d5 itself, and says why.
        assert "listed by upsync itself, not by the poller" in sidecar.logs() and "path=d5" in sidecar.logs()
    at_start_s = time.monotonic() - start

    # Later: a folder moved in (an unzipped plugin archive, say) whose first subfolder cannot be read.
    incoming = workdir / "incoming"
    subs = [f"s{i}" for i in range(5)]
    for s in subs:
        (incoming / s).mkdir(parents=True)
    chown_tree(incoming, sshd.user)
    (incoming / "a-locked").mkdir(mode=0o700)  # root's
    full = lambda: sidecar.metric("upsync_syncs_total", kind="full", status="success")  # noqa: E731
    fulls = full()
    os.rename(incoming, source / "incoming")
    wait_until(lambda: full() > fulls, 15, "the full sync after the watch was made again")
    start = time.monotonic()
    for s in subs:
        (source / "incoming" / s / "probe.jpg").write_text(s)
    wait_until(
        lambda: all((sshd.root / "incoming" / s / "probe.jpg").exists() for s in subs),
        15,
        "uploads into the new folder",
    )
    record(
        backend=backend,
        directories=len(dirs),
        delivered_after_start_s=round(at_start_s, 2),
        delivered_in_moved_folder_s=round(time.monotonic() - start, 2),
        full_syncs=full(),
    )
