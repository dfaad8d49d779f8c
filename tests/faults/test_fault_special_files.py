"""What cannot or must not be copied: a FIFO, a socket, an unreadable file and directory, symlinks out of the tree.

The daemon runs as the unprivileged ``upsync-test`` (root reads everything, so "unreadable" needs
another uid), on a source it owns, with a private copy of the key. Expected: each such path skipped
(or copied safely: a symlink inside the tree is kept as a link), the daemon never hangs on them (a
FIFO opened for reading would block forever) and keeps replicating later files, and each is reported
once, however many batches and full syncs meet it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import PrefixedSidecar, count_entries, user_daemon, wait_synced
from tests.helpers import Sidecar, assert_converges, tree, tree_diff, wait_until
from tests.sshd import KeyPair, SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid, ssh target account)"),
]

SKIPPED = ("pipe", "sock", "secret.jpg", "locked", "passwd-link", "up-link")


@pytest.fixture
def user_sidecar(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar]
) -> PrefixedSidecar:
    sidecar = user_daemon(
        source,
        sshd,
        client_key,
        workdir,
        sidecars,
        # Full syncs meet the special files again every 2 s. (Not SIGHUP: a signal the kernel hands
        # to a thread other than the main one is not acted on, see test_fault_signals.py.)
        SYNC_FULL_SYNC_INTERVAL="2",
    )
    sidecar.start()
    wait_synced(sidecar)
    return sidecar


def full_syncs(sidecar: Sidecar) -> int:
    return sum(1 for line in sidecar.logs().splitlines() if " synced " in line and "kind=full" in line)


def mentions(sidecar: Sidecar, name: str) -> int:
    """Log lines reporting a path whose last component is ``name``."""
    lines = sidecar.logs().splitlines()
    return sum(1 for ln in lines if (" WARNING " in ln or " ERROR " in ln) and (f"/{name}" in ln or f"={name}" in ln))


def make_specials(source: Path, user: str) -> socket.socket:
    """Create every kind of path that must not be copied; returns the socket's listener (close it)."""
    entry = pwd.getpwnam(user)
    os.mkfifo(source / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(source / "sock"))
    (source / "secret.jpg").write_bytes(b"root only")
    (source / "secret.jpg").chmod(0o000)  # owned by root: the daemon's uid cannot read it
    (source / "locked").mkdir(mode=0o700)
    (source / "locked" / "inside.jpg").write_text("root only")
    (source / "passwd-link").symlink_to("/etc/passwd")
    (source / "up-link").symlink_to("../..")
    (source / "inside-link").symlink_to("seed.txt")  # safe: kept as a link
    for name in ("pipe", "sock", "passwd-link", "up-link", "inside-link"):
        os.lchown(source / name, entry.pw_uid, entry.pw_gid)
    return listener


def write_as(path: Path, user: str) -> None:
    path.write_text("still replicating")
    shutil.chown(path, user, user)  # the daemon's uid owns it, as uploads would be


def next_full_sync(sidecar: Sidecar) -> None:
    before = full_syncs(sidecar)
    wait_until(lambda: full_syncs(sidecar) > before, 10, "the next periodic full sync")


def test_special_files_skipped_safely(source: Path, sshd: SshServer, user_sidecar: PrefixedSidecar, record) -> None:
    sidecar = user_sidecar
    listener = make_specials(source, sshd.user)
    try:
        started = time.monotonic()
        write_as(source / "after-1.txt", sshd.user)
        wait_until(lambda: (sshd.root / "after-1.txt").exists(), 10, "a later file (the daemon did not hang)")
        after_1_s = time.monotonic() - started
        for _ in range(2):  # full syncs meet the same paths again
            next_full_sync(sidecar)
        write_as(source / "after-2.txt", sshd.user)
        wait_until(lambda: (sshd.root / "after-2.txt").exists(), 10, "a file after the full syncs")
        assert_converges(source, sshd.root, 10, ignore=SKIPPED)
    finally:
        listener.close()
    target = tree(sshd.root)
    reports = {name: mentions(sidecar, name) for name in SKIPPED}
    record(
        files_checked=count_entries(source),
        daemon_uid=sshd.user,
        later_file_s=round(after_1_s, 1),
        full_syncs_meeting_them=2,
        reports_per_path=reports,
        on_target={name: target.get(name, "-") for name in (*SKIPPED, "inside-link")},
    )
    assert target["inside-link"] == "link:seed.txt"
    assert not tree_diff(source, sshd.root, ignore=SKIPPED)
    for name in ("pipe", "sock", "secret.jpg", "passwd-link", "up-link", "locked/inside.jpg"):
        assert name not in target, f"{name} must not reach the target"
    assert target.get("locked") in (None, "dir")  # at most the (empty) directory itself
    assert all(count >= 1 for count in reports.values()), f"every skipped path reported: {reports}"
    sidecar.check_alive()


def test_unreadable_reported_once(source: Path, sshd: SshServer, user_sidecar: PrefixedSidecar, record) -> None:
    sidecar = user_sidecar
    listener = make_specials(source, sshd.user)
    listener.close()
    write_as(source / "after.txt", sshd.user)
    wait_until(lambda: (sshd.root / "after.txt").exists(), 10, "the batch with the special files")
    next_full_sync(sidecar)
    reports = {name: mentions(sidecar, name) for name in SKIPPED}
    record(reports_per_path=reports)
    assert reports == dict.fromkeys(SKIPPED, 1), f"each skipped path reported once: {reports}"
