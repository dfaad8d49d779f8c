"""SYNC_RESUME: a full sync cut mid-file, then run again. What the receiver keeps decides whether it resumes:

* Debian 12's own rsync 3.2.7 behind its ``rrsync -wo`` keeps the partial data in ``.upsync-partial/`` next to
  the file, and the next full sync sends only the rest;
* rsync 3.5.0's hardened ``rrsync -wo`` accepts ``--partial-dir`` but pins it to ``/proc/self/fd/N``; rsync's
  receiver ``lstat()``s that, sees a symlink, fails to replace it and drops the data: the next sync starts
  from zero. (Its only trace: an empty ``.upsync-partial/`` at the jail's root.) This test pins that finding,
  so a fixed rrsync shows up here.

The cut: the ``once`` process is killed (with its ssh master) mid-transfer, as a crash or a node restart would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import Sidecar, tree_diff, wait_until
from tests.old_rsync import old_rrsync
from tests.sshd import KeyPair, SshServer

pytestmark = pytest.mark.integration

SIZE = 8_000_000


def _jail_busy(root: Path) -> bool:
    """Does any process still work in this jail (rrsync or its rsync, after the cut)?"""
    needle = str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _cut_first_sync(source: Path, target: SshServer, key: KeyPair, workdir: Path) -> None:
    """Start ``once`` slowed down, kill it (and its ssh) once 2 MB of the file are on the target."""
    sidecar = Sidecar(source, [target], key, workdir, SYNC_RESUME="true", SYNC_BWLIMIT="1M")
    sidecar.start("once")
    try:

        def landing() -> bool:
            sidecar.check_alive()
            return any(p.stat().st_size >= 2_000_000 for p in target.root.glob(".big.bin.*"))

        wait_until(landing, 30, "2 MB of big.bin on the target")
    finally:
        sidecar.kill()
    wait_until(lambda: not _jail_busy(target.root), 15, "the receiver to finish after the cut")


def _second_sync(source: Path, target: SshServer, key: KeyPair, workdir: Path) -> list[dict]:
    proc = Sidecar(source, [target], key, workdir, SYNC_RESUME="true", SYNC_LOG_FORMAT="json").run("once")
    assert proc.returncode == 0, proc.stderr
    assert not tree_diff(source, target.root, ignore=(".upsync-partial",))
    return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def big(source: Path) -> Path:
    path = source / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_debian12_rrsync_keeps_the_partial_file_and_the_next_full_sync_resumes(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, big: Path
) -> None:
    try:
        command = f"{old_rrsync()} -wo"
    except RuntimeError as exc:
        pytest.fail(f"Debian 12's rsync is needed for this test: {exc}")
    target = SshServer(workdir / "sshd-3.2.7", client_key, sshd.host_key, rrsync_cmd=command).start()
    try:
        _cut_first_sync(source, target, client_key, workdir)
        partial = target.root / ".upsync-partial" / "big.bin"
        assert partial.is_file() and partial.stat().st_size >= 2_000_000, sorted(target.root.rglob("*"))
        kept = partial.stat().st_size
        assert not (target.root / "big.bin").exists()  # never half a file under its real name
        logs = _second_sync(source, target, client_key, workdir)
        reused = [d for d in logs if d["msg"] == "full sync reused data on the target"]
        # All but the partial file's last (incomplete) block is matched, not sent again.
        assert reused and kept - 65536 < reused[0]["bytes"] <= kept, logs
        assert not partial.exists()  # used up
    finally:
        target.stop()


def test_rsync35_rrsync_accepts_partial_dir_but_drops_the_data(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, big: Path
) -> None:
    _cut_first_sync(source, sshd, client_key, workdir)
    partial_dir = sshd.root / ".upsync-partial"
    # rrsync made (and pinned) the directory at the jail's root, and rsync could not put anything in it.
    assert partial_dir.is_dir() and list(partial_dir.iterdir()) == []
    assert not list(sshd.root.glob(".big.bin.*")) and not (sshd.root / "big.bin").exists()
    logs = _second_sync(source, sshd, client_key, workdir)
    assert not [d for d in logs if d["msg"] == "full sync reused data on the target"]  # from zero


def test_partial_directories_are_never_sent_on_and_never_keep_a_deleted_directory(
    source: Path, sshd: SshServer, run_sidecar
) -> None:
    # As on content, whose copy the fanout reads: partial data of an upstream resumable sync.
    (source / ".upsync-partial").mkdir()
    (source / ".upsync-partial/big.bin").write_bytes(b"half")
    (source / "2026/.upsync-partial").mkdir(parents=True)
    (source / "2026/photo.jpg").write_bytes(b"jpg")
    # On the target: a directory gone from the source, holding stale partial data.
    (sshd.root / "old/.upsync-partial").mkdir(parents=True)
    (sshd.root / "old/.upsync-partial/stale.bin").write_bytes(b"stale")
    for path in (sshd.root / "old", *(sshd.root / "old").rglob("*")):
        shutil.chown(path, sshd.user, sshd.user)  # as if the account had written them
    sidecar = run_sidecar()
    partials = (".upsync-partial", "2026/.upsync-partial")
    assert not tree_diff(source, sshd.root, ignore=partials)
    assert not (sshd.root / ".upsync-partial/big.bin").exists()
    assert not (sshd.root / "old").exists()  # the perishable rule does not keep it
    (source / "2026/.upsync-partial/more.bin").write_bytes(b"half")  # a batch: planned, not sent
    (source / "2026/after.jpg").write_bytes(b"jpg")
    wait_until(lambda: (sshd.root / "2026/after.jpg").exists(), 10, "the batch")
    assert not (sshd.root / "2026/.upsync-partial").exists()
    sidecar.check_alive()
