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

from tests.faults.faultlib import PrefixedSidecar, as_user, count_entries, wait_synced
from tests.faults.test_fault_special_files import chown_tree
from tests.helpers import Sidecar, assert_converges, wait_until
from tests.sshd import KeyPair, SshServer
from tests.test_trust import SECRET, assert_no_secret, exchange, needs_landlock, secret_dir

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@needs_landlock
def test_racing_directory_swaps_never_ship_an_outside_file(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path, record
) -> None:
    # An attacker swapping a directory with a link to the key directory as fast as it can, for 3 s, while
    # files keep arriving in that directory: nothing from outside ever reaches the target.
    outside = secret_dir(workdir)
    run_sidecar()
    (source / "d").mkdir()
    (source / "swap").symlink_to(outside)
    stop = threading.Event()
    swaps = [0]

    def attacker() -> None:
        deadline = time.monotonic() + 3.0
        while not stop.is_set() and time.monotonic() < deadline:
            exchange(source / "d", source / "swap")
            swaps[0] += 1

    thread = threading.Thread(target=attacker)
    thread.start()
    real = os.open(source / "d", os.O_RDONLY | os.O_DIRECTORY)  # the real directory, whatever its name now
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
    user = sshd.user
    (source / "lost+found").mkdir(mode=0o700)  # stays root's: unreadable for the daemon
    (source / "kept.jpg").write_text("kept")
    chown_tree(source, user)
    shutil.chown(source / "lost+found", "root", "root")
    (sshd.root / "lost+found").mkdir()
    (sshd.root / "lost+found/untouched").write_text("neither sent nor deleted")
    (sshd.root / "missed-delete.jpg").write_text("deleted while nobody watched")
    keys = workdir / "user-key"
    keys.mkdir(mode=0o700)
    shutil.copy(client_key.private, keys / "id")
    (keys / "id").chmod(0o600)
    chown_tree(keys, user)
    runtime = workdir / "user-runtime"
    runtime.mkdir()
    shutil.chown(runtime, user, user)
    sidecar = PrefixedSidecar(
        as_user(user),
        source,
        [sshd],
        KeyPair(keys, "id"),
        workdir,
        SYNC_RUNTIME_DIR=str(runtime),
        SYNC_FULL_SYNC_INTERVAL="2",
        HOME=str(workdir),
    )
    sidecars.append(sidecar)
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
