"""The daemon from this checkout against each target rsync version, through the target's own ``rrsync -wo``.

Each case: a fresh target directory, the real daemon (``python -m sidecar``) on the host, a change on the
source, and an assertion on the target's files (compared byte for byte with the source) and on exit codes.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.compat.targets import TargetContainer
from tests.helpers import Sidecar, tree, tree_diff, wait_until
from tests.sshd import KeyPair

pytestmark = pytest.mark.integration

# Debian's 3.2.7-1+deb12u5 and later carry the 2026 security backport that rejects the mode-0 entries
# --delete-missing-args sends ("invalid file mode 00 ... protocol incompatibility (code 2)"); upstream
# fixed it in 3.4.4 (RsyncProject/rsync#910). A batch with a delete failed against it unless every missing
# entry came first in the list and was top-level (docs/compatibility.md); each case below has a nested one.
# The daemon now probes each receiver and deletes by filter rules where it must: these pass on every version.

# Names that break naive handling: shell and option syntax, rsync wildcards and filter-rule syntax
# (a delete expressed as filter rules must escape them), a newline, unicode, edge whitespace.
ODD_NAMES = (
    "with space.jpg",
    "new\nline.jpg",
    "ünïcödé-日本.jpg",
    "-leading-dash.jpg",
    "--delete",
    "[*?\\].jpg",
    "x[ab].jpg",
    "back\\slash.jpg",
    "+ x",
    "- y",
    "R risk",
    "P protect",
    "! clear",
    ". merge",
    ": dir-merge",
    "sub#comment",
    " leading space",
    "trailing space ",
)
ODD_DIR = "-dir [x] + y"
# rsync --files-from reads an entry that begins with # or ; as a comment: see test_names_like_files_from_comments.
# Inside a directory they are safe (the entry begins with the directory's name).
ODD_NAMES_NESTED = (*ODD_NAMES, "#comment", ";comment")


def odd_paths() -> list[str]:
    return [*ODD_NAMES, *(f"{ODD_DIR}/{name}" for name in ODD_NAMES_NESTED)]


def start(
    target: TargetContainer, source: Path, key: KeyPair, workdir: Path, sidecars: list[Sidecar], **env: str
) -> Sidecar:
    """The daemon against ``target``'s current directory, not yet started."""
    known = workdir / "known_hosts"
    known.write_text(target.known_hosts_line() + "\n")
    sidecar = Sidecar(source, target.url, key, workdir, SYNC_SSH_KNOWN_HOSTS_FILE=str(known), **env)
    sidecars.append(sidecar)
    return sidecar


def converge(sidecar: Sidecar, source: Path, dst: Path, timeout: float = 20) -> None:
    """Wait until ``dst`` is byte-identical to ``source``; fail at once when the daemon gives up on the target."""

    def done() -> bool:
        sidecar.check_alive()
        _code, doc = sidecar.readyz()
        for each in doc.get("targets", []):
            if each.get("state") == "fatal":
                raise AssertionError(f"the daemon gave up on the target: {each.get('message')}")
        return not tree_diff(source, dst)

    try:
        wait_until(done, timeout, "convergence")
    except TimeoutError:
        diff = tree_diff(source, dst)
        raise AssertionError(f"not converged after {timeout} s; {len(diff)} differences: {diff[:10]}") from None


@pytest.fixture
def daemon(target: TargetContainer, dst: Path, source: Path, client_key: KeyPair, workdir: Path, sidecars):
    """Start the daemon against this test's target directory; extra kwargs are SYNC_* settings."""

    def run(ready: bool = True, **env: str) -> Sidecar:
        sidecar = start(target, source, client_key, workdir, sidecars, **env).start()
        if ready:
            sidecar.wait_ready()
            assert not tree_diff(source, dst), "ready means the first full sync is done"
        return sidecar

    return run


def fill(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_create(source: Path, dst: Path, daemon) -> None:
    sidecar = daemon()
    fill(source, {"2026/12/a.jpg": os.urandom(70_000), "2026/12/b.txt": b"b", "top.txt": b"top"})
    converge(sidecar, source, dst)


def test_modify_same_size_within_a_second(source: Path, dst: Path, daemon) -> None:
    fill(source, {"2026/12/a.txt": b"version 1"})
    sidecar = daemon()
    f = source / "2026/12/a.txt"
    stamp = f.stat().st_mtime_ns
    f.write_bytes(b"version 2")
    # Same size and the very same mtime as the copy on the target: rsync's quick check cannot see it.
    os.utime(f, ns=(stamp, stamp))
    converge(sidecar, source, dst)
    assert (dst / "2026/12/a.txt").read_bytes() == b"version 2"


def test_delete_file(source: Path, dst: Path, daemon) -> None:
    fill(source, {"2026/12/a.txt": b"a", "2026/12/b.txt": b"b"})
    sidecar = daemon()
    (source / "2026/12/b.txt").unlink()
    converge(sidecar, source, dst)
    assert not (dst / "2026/12/b.txt").exists()


def test_delete_directory_with_files(source: Path, dst: Path, daemon) -> None:
    fill(source, {"2026/album/1.jpg": b"1", "2026/album/sub/2.jpg": b"2", "2026/album-2/keep.jpg": b"k"})
    fill(source, {"top/3.jpg": b"3", "top/sub/4.jpg": b"4"})
    sidecar = daemon()
    shutil.rmtree(source / "2026/album")
    shutil.rmtree(source / "top")
    converge(sidecar, source, dst)
    assert not (dst / "2026/album").exists() and (dst / "2026/album-2/keep.jpg").exists()


def test_rename_file(source: Path, dst: Path, daemon) -> None:
    fill(source, {"album/0.jpg": b"zero", "other/.keep": b""})
    sidecar = daemon()
    (source / "album/0.jpg").rename(source / "album/zero.jpg")
    converge(sidecar, source, dst)
    (source / "album/zero.jpg").rename(source / "other/zero.jpg")
    converge(sidecar, source, dst)
    assert not (dst / "album/0.jpg").exists() and not (dst / "album/zero.jpg").exists()


def test_rename_directory(source: Path, dst: Path, daemon) -> None:
    fill(source, {f"2026/album/{i}.jpg": os.urandom(1000) for i in range(5)} | {"2026/album/sub/x.jpg": b"x"})
    sidecar = daemon()
    (source / "2026/album").rename(source / "2026/album-renamed")
    converge(sidecar, source, dst)
    (source / "2026").rename(source / "2027")
    converge(sidecar, source, dst)
    assert sorted(os.listdir(dst)) == ["2027", "seed.txt"]


def test_odd_names(source: Path, dst: Path, daemon) -> None:
    sidecar = daemon()
    (source / ODD_DIR).mkdir()
    for path in odd_paths():
        (source / path).write_text(path)
    converge(sidecar, source, dst)


def test_odd_names_deleted(source: Path, dst: Path, daemon) -> None:
    (source / ODD_DIR).mkdir()
    for path in odd_paths():
        (source / path).write_text(path)
    for bystander in ("x-bystander.jpg", f"{ODD_DIR}/xa.jpg", f"{ODD_DIR}/x[ab].jpg-bystander"):
        (source / bystander).write_text("a wildcard or prefix must not take this one along")
    # Most of the site goes at once: past the relative delete limit, which is not what this case tests.
    sidecar = daemon(SYNC_MAX_DELETE_PERCENT="100")
    for path in odd_paths():
        (source / path).unlink()
    converge(sidecar, source, dst)
    assert sorted(os.listdir(dst)) == [ODD_DIR, "seed.txt", "x-bystander.jpg"]
    assert sorted(os.listdir(dst / ODD_DIR)) == ["x[ab].jpg-bystander", "xa.jpg"]


def test_delete_guard_in_a_batch(source: Path, dst: Path, daemon) -> None:
    fill(source, {f"img-{i}.jpg": os.urandom(300) for i in range(8)})
    # A long quiet window: the six deletes must reach the daemon as one batch even on a loaded machine
    # (split in two, each part would be within the limit, and rightly deleted).
    sidecar = daemon(SYNC_MAX_DELETE="3", SYNC_QUIET_MS="500", SYNC_MAX_DELAY_MS="5000")
    for i in range(6):
        (source / f"img-{i}.jpg").unlink()
    (source / "added-meanwhile.jpg").write_text("x")

    def tripped() -> dict | None:
        code, doc = sidecar.readyz()
        return doc if code == 503 and "delete_guard" in str(doc) else None

    doc = wait_until(tripped, 15, "/readyz 503 with delete_guard")
    assert "more than SYNC_MAX_DELETE=3" in str(doc)
    wait_until(lambda: (dst / "added-meanwhile.jpg").exists(), 10, "additions to go through")
    assert all((dst / f"img-{i}.jpg").exists() for i in range(8)), "deleted nothing"


def test_delete_guard_in_a_full_sync(source: Path, dst: Path, daemon) -> None:
    fill(dst, {f"only-on-target-{i}": b"x" for i in range(5)})
    for path in dst.iterdir():
        os.chown(path, 10001, 10001)
    sidecar = daemon(ready=False, SYNC_MAX_DELETE="4")

    def tripped() -> dict | None:
        code, doc = sidecar.readyz()
        return doc if code == 503 and "delete_guard" in str(doc) else None

    doc = wait_until(tripped, 15, "/readyz 503 with delete_guard")
    assert "a full sync would delete 5 paths" in str(doc)
    assert all((dst / f"only-on-target-{i}").exists() for i in range(5)), "deleted nothing"
    assert (dst / "seed.txt").read_text() == "seed\n", "but sent everything"


def test_full_sync_deletes(source: Path, dst: Path, daemon) -> None:
    """What was deleted while the daemon was not running goes with ``once``, and with a restart."""
    fill(source, {"gone.jpg": b"g", "album/1.jpg": b"1", "album/sub/2.jpg": b"2", "2026/12/gone.jpg": b"g"})
    fill(source, {"2026/12/kept.jpg": b"k", "2026/11/a.jpg": b"a", "2026/11/sub/b.jpg": b"b"})
    sidecar = daemon()
    assert sidecar.stop(signal.SIGTERM) == 0
    (source / "gone.jpg").unlink()
    (source / "2026/12/gone.jpg").unlink()
    shutil.rmtree(source / "album")
    assert (dst / "gone.jpg").exists() and (dst / "album/sub/2.jpg").exists()
    result = sidecar.run("once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not tree_diff(source, dst)

    shutil.rmtree(source / "2026/11")
    daemon()  # ready: its first full sync is done, and has deleted what went while nothing was running
    assert not tree_diff(source, dst)


def test_check_exits_zero(source: Path, dst: Path, target: TargetContainer, client_key: KeyPair, workdir, sidecars):
    result = start(target, source, client_key, workdir, sidecars).run("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok   target ssh://upsync@{target.address}:22/" in result.stdout
    assert tree(dst) == {}, "the probe file was deleted again"


def test_names_like_files_from_comments(source: Path, dst: Path, daemon) -> None:
    sidecar = daemon()
    for name in ("#comment.jpg", ";comment.jpg"):
        (source / name).write_text(name)
    (source / "sentinel.jpg").write_text("written last")
    # Sent in the same batch as the names above, or a later one: once it is there, they were sent too.
    wait_until(lambda: (dst / "sentinel.jpg").exists(), 15, "the sentinel on the target")
    sidecar.check_alive()
    diff = tree_diff(source, dst)
    if sidecar.metric("upsync_syncs_total", kind="full") > 1:
        # A full sync (after a stall of a starved daemon) sends them too: this run proves nothing about batches.
        pytest.skip("a full sync ran meanwhile")
    assert not diff
