"""The source volume going wrong while the daemon runs, and coming back.

tests/test_guard.py already covers: the source emptied, deleted (and made again), a tmpfs source
unmounted (with a stray file underneath), too many deletes. Here: the source replaced by an empty
directory, a wrong (non-empty) volume mounted over it, the source replaced by a file, a bind-mounted
source unmounted and mounted again, each followed by the real source coming back; and a bind mount
from the same file system, which the device check cannot tell apart.
Every case: the target untouched while the source is wrong, /readyz 503, a WARNING/ERROR line, then
byte-identical again once the source is back.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import count_entries, tmpfs, umount
from tests.helpers import Sidecar, assert_converges, tree, wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, ssh target account)"),
]


def fill(root: Path, n: int, tag: str = "img") -> None:
    for i in range(n):
        (root / f"{tag}-{i:03d}.jpg").write_bytes(os.urandom(500))


def refused(sidecar: Sidecar, state: str, timeout: float = 15) -> tuple[dict, float]:
    """Wait for /readyz 503 naming ``state``; returns the document and the seconds it took."""
    start = time.monotonic()

    def check() -> dict | None:
        code, doc = sidecar.readyz()
        return doc if code == 503 and state in str(doc) else None

    doc = wait_until(check, timeout, f"/readyz 503 with {state}")
    return doc, time.monotonic() - start  # type: ignore[return-value]


def loud(sidecar: Sidecar, needle: str) -> list[str]:
    return [ln for ln in sidecar.logs().splitlines() if (" WARNING " in ln or " ERROR " in ln) and needle in ln]


def come_back(sidecar: Sidecar, source: Path, target: Path) -> tuple[float, float]:
    """After the real source is back: seconds to /readyz 200 and to byte-identical (with a new file)."""
    start = time.monotonic()
    (source / "after-return.jpg").write_bytes(os.urandom(700))
    sidecar.wait_ready(20)
    ready_s = time.monotonic() - start
    assert_converges(source, target, 20)
    return ready_s, time.monotonic() - start


def test_replaced_by_empty_directory_then_back(
    source: Path, sshd: SshServer, start_synced, workdir: Path, record
) -> None:
    fill(source, 10)
    sidecar = start_synced()
    before = tree(sshd.root)
    real = workdir / "source.real"
    source.rename(real)
    source.mkdir()  # e.g. a container recreated the uploads directory: same file system, empty
    doc, detect_s = refused(sidecar, "delete_guard")
    assert "is empty" in str(doc)
    assert tree(sshd.root) == before
    assert loud(sidecar, "DELETE GUARD")
    source.rmdir()
    real.rename(source)
    ready_s, converge_s = come_back(sidecar, source, sshd.root)
    record(
        files_checked=count_entries(source),
        detect_s=round(detect_s, 1),
        back_ready_s=round(ready_s, 1),
        converge_s=round(converge_s, 1),
    )


def test_wrong_volume_mounted_over_then_unmounted(source: Path, sshd: SshServer, start_synced, record) -> None:
    fill(source, 10)
    sidecar = start_synced()
    before = tree(sshd.root)
    with tmpfs(source, "4m"):
        (source / "stray.jpg").write_text("another volume")  # not empty: only the device check protects
        doc, detect_s = refused(sidecar, "source_guard")
        assert "is not the mount it was at start" in doc["message"]
        wait_until(lambda: loud(sidecar, "source_guard"), 10, "a warning naming the source guard")
        assert tree(sshd.root) == before
    ready_s, converge_s = come_back(sidecar, source, sshd.root)
    record(
        files_checked=count_entries(source),
        detect_s=round(detect_s, 1),
        back_ready_s=round(ready_s, 1),
        converge_s=round(converge_s, 1),
    )


def test_replaced_by_a_file_then_back(source: Path, sshd: SshServer, start_synced, workdir: Path, record) -> None:
    fill(source, 10)
    sidecar = start_synced()
    before = tree(sshd.root)
    real = workdir / "source.real"
    source.rename(real)
    source.write_text("not a directory")
    doc, detect_s = refused(sidecar, "source_guard")
    assert "is no longer a directory" in doc["message"]
    wait_until(lambda: loud(sidecar, "no longer a directory"), 10, "a warning naming the problem")
    assert tree(sshd.root) == before
    source.unlink()
    real.rename(source)
    ready_s, converge_s = come_back(sidecar, source, sshd.root)
    record(
        files_checked=count_entries(source),
        detect_s=round(detect_s, 1),
        back_ready_s=round(ready_s, 1),
        converge_s=round(converge_s, 1),
    )


def test_bind_mount_unmounted_then_mounted_again(
    source: Path, sshd: SshServer, start_synced, workdir: Path, record
) -> None:
    """A volume (here a tmpfs, bind-mounted as Docker does) unmounted, then mounted again: same device."""
    volume = workdir / "volume"
    volume.mkdir()
    with tmpfs(volume, "8m"):
        data = volume / "uploads"
        data.mkdir()
        fill(data, 10)
        (data / "seed.txt").write_text("seed\n")
        subprocess.run(["mount", "--bind", str(data), str(source)], check=True)
        try:
            sidecar = start_synced()
            before = tree(sshd.root)
            umount(source)  # underneath: the mount point directory, with the fixture's seed.txt in it
            (source / "written-while-unmounted.jpg").write_text("x")
            doc, detect_s = refused(sidecar, "source_guard")
            assert "is not the mount it was at start" in doc["message"]
            assert tree(sshd.root) == before
            (source / "written-while-unmounted.jpg").unlink()
            subprocess.run(["mount", "--bind", str(data), str(source)], check=True)
            ready_s, converge_s = come_back(sidecar, source, sshd.root)
            record(
                files_checked=count_entries(source),
                detect_s=round(detect_s, 1),
                back_ready_s=round(ready_s, 1),
                converge_s=round(converge_s, 1),
            )
        finally:
            umount(source)


def test_same_filesystem_bind_mount_unmounted(
    source: Path, sshd: SshServer, start_synced, workdir: Path, record
) -> None:
    data = workdir / "uploads-on-the-same-fs"
    data.mkdir()
    fill(data, 10)
    (data / "seed.txt").write_text("seed\n")
    subprocess.run(["mount", "--bind", str(data), str(source)], check=True)
    try:
        sidecar = start_synced()
        before = tree(sshd.root)
        umount(source)  # underneath: the fixture's seed.txt, on the same device as the volume
        lost: list[str] = []
        try:
            refused(sidecar, "source_guard", timeout=8)
        finally:
            lost = sorted(set(before) - set(tree(sshd.root)))
            record(target_files_before=len(before), deleted_from_target=len(lost))
        assert not lost
    finally:
        umount(source)
