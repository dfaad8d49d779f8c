"""The delete guard: a missing, unmounted or emptied source, or too many deletes, never empties a target."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import assert_converges, tree, wait_until
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


def fill(source: Path, n: int) -> None:
    for i in range(n):
        (source / f"img-{i:03d}.jpg").write_bytes(os.urandom(300))


def not_ready(sidecar, state: str) -> dict:
    def check() -> dict | None:
        code, doc = sidecar.readyz()
        return doc if code == 503 and state in str(doc) else None

    return wait_until(check, 15, f"/readyz 503 with {state}")  # type: ignore[return-value]


def test_source_emptied_refuses_deletes(source: Path, sshd: SshServer, run_sidecar) -> None:
    fill(source, 10)
    sidecar = run_sidecar()
    before = tree(sshd.root)
    for entry in source.iterdir():
        entry.unlink()
    doc = not_ready(sidecar, "delete_guard")
    assert "is empty" in str(doc)
    assert tree(sshd.root) == before  # untouched
    assert "DELETE GUARD" in sidecar.logs()
    assert sidecar.metric("upsync_delete_guard_tripped") == 1
    # new uploads still flow while deletes are held back
    (source / "new.jpg").write_bytes(b"new")
    wait_until(lambda: (sshd.root / "new.jpg").exists(), 10, "an upload to still be replicated")
    assert (sshd.root / "img-000.jpg").exists()


def test_source_missing_keeps_target_and_recovers(source: Path, sshd: SshServer, run_sidecar, workdir: Path) -> None:
    fill(source, 5)
    sidecar = run_sidecar()
    before = tree(sshd.root)
    shutil.rmtree(source)
    doc = not_ready(sidecar, "source_guard")
    assert "is gone" in doc["message"]
    assert tree(sshd.root) == before
    source.mkdir()
    # (new names: a full sync skips same-size files rewritten within the same second, as rsync does)
    for i in range(5):
        (source / f"back-{i}.jpg").write_bytes(os.urandom(400))
    (source / "seed.txt").write_text("seed\n")
    (source / "after.jpg").write_text("back")
    assert_converges(source, sshd.root, 20)
    sidecar.wait_ready()


def test_too_many_deletes_in_one_batch(source: Path, sshd: SshServer, run_sidecar) -> None:
    fill(source, 8)
    sidecar = run_sidecar(SYNC_MAX_DELETE="3")
    for i in range(6):
        (source / f"img-{i:03d}.jpg").unlink()
    (source / "added-meanwhile.jpg").write_text("x")
    doc = not_ready(sidecar, "delete_guard")
    assert "more than SYNC_MAX_DELETE=3" in str(doc)
    wait_until(lambda: (sshd.root / "added-meanwhile.jpg").exists(), 10, "additions to go through")
    assert all((sshd.root / f"img-{i:03d}.jpg").exists() for i in range(6))


def test_full_sync_counts_before_deleting(source: Path, sshd: SshServer, run_sidecar) -> None:
    for i in range(5):
        (sshd.root / f"only-on-target-{i}").write_text("x")
    sidecar = run_sidecar(ready=False, SYNC_MAX_DELETE="4")
    doc = not_ready(sidecar, "delete_guard")
    assert "a full sync would delete 5 paths" in str(doc)
    assert all((sshd.root / f"only-on-target-{i}").exists() for i in range(5))  # nothing deleted at all
    assert (sshd.root / "seed.txt").exists()  # but everything was sent


def test_empty_source_facing_a_full_target(source: Path, sshd: SshServer, run_sidecar) -> None:
    (source / "seed.txt").unlink()
    (sshd.root / "precious.jpg").write_text("x")
    sidecar = run_sidecar(ready=False)
    doc = not_ready(sidecar, "delete_guard")
    assert "the source is empty but a full sync would delete 1 paths" in str(doc)
    assert (sshd.root / "precious.jpg").exists()


def test_empty_source_and_empty_target_is_ready(source: Path, sshd: SshServer, run_sidecar) -> None:
    (source / "seed.txt").unlink()
    run_sidecar()  # a fresh install: nothing to delete, nothing refused


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_unmounted_source_is_refused(source: Path, sshd: SshServer, run_sidecar) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(source)], check=True)
    try:
        fill(source, 5)
        sidecar = run_sidecar()
        before = tree(sshd.root)
        subprocess.run(["umount", str(source)], check=True)
        (source / "stray-on-the-underlying-dir").write_text("x")  # not empty, yet not the volume
        doc = not_ready(sidecar, "source_guard")
        assert "is not the mount it was at start" in doc["message"]
        sidecar.proc.send_signal(__import__("signal").SIGHUP)  # even a forced full sync must not delete
        wait_until(
            lambda: (
                "source_guard" in sidecar.logs() or sidecar.metric("upsync_failures_total", reason="source_guard") > 0
            ),
            10,
            "the full sync to be refused",
        )
        assert tree(sshd.root) == before
    finally:
        subprocess.run(["umount", str(source)], check=False, capture_output=True)


def test_a_recent_check_stands_for_sends_but_never_for_deletes(tmp_path: Path) -> None:
    # The targets of one batch share a check made within RECENT_S (sends); a delete's check is always made now.
    from sidecar.guard import RECENT_S, GuardError, SourceGuard

    src = tmp_path / "src"
    src.mkdir()
    guard = SourceGuard(str(src))
    guard.check()
    src.rename(tmp_path / "moved")
    with pytest.raises(GuardError, match="is gone"):
        guard.check()  # afresh: sees it at once
    (tmp_path / "moved").rename(src)
    guard.check(RECENT_S)  # passes and is remembered ...
    src.rename(tmp_path / "moved")
    guard.check(3600.0)  # ... so a send within the window relies on it
    with pytest.raises(GuardError, match="is gone"):
        guard.check()  # a delete does not
    with pytest.raises(GuardError, match="is gone"):
        guard.check(RECENT_S)  # nor a send once the failed check is the last one
