"""Trust: nothing leaves the tree, every delete that should happen happens, nothing wipes a small site,
nothing crashes the daemon. The real daemon against a real sshd with an ``rrsync -wo`` account.

Each test names the hole it closes; each failed on the daemon before the fix.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.filters import Excludes
from sidecar.rsync import Rsync
from sidecar.sandbox import HELPER, RECHECK_S, SourceSandbox, abi_version, find_helper
from tests.helpers import Sidecar, assert_converges, tree, wait_until
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the web"
needs_landlock = pytest.mark.skipif(abi_version() < 1, reason="the kernel offers no Landlock")

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE), as an attacker racing the planner would."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def secret_dir(workdir: Path) -> Path:
    """Stands for /etc/upsync/ssh: readable by the daemon, outside the source."""
    path = workdir / "etc-upsync-ssh"
    path.mkdir()
    (path / "id_ed25519").write_bytes(SECRET)
    (path / "held.bin").write_bytes(SECRET)
    return path


def assert_no_secret(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            try:
                data = b"" if path.is_symlink() else path.read_bytes()
            except FileNotFoundError:
                continue  # rsync's temporary file, renamed meanwhile: its final name is read too
            assert SECRET not in data, f"{path} holds a file from outside the source"


# ----- 1. no path out of the tree --------------------------------------------------------------------


def test_a_file_held_back_while_written_is_never_read_through_a_swapped_parent(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path
) -> None:
    # The scenario: a file is held back as still being written; meanwhile its directory becomes a
    # symlink to the key directory, where a file of the same name exists. The held-back path is planned again
    # when the writer closes: it must not be read through the link.
    outside = secret_dir(workdir)
    run_sidecar()
    (source / "d").mkdir()
    writer = open(source / "d/held.bin", "wb")  # noqa: SIM115 (held open across the swap)
    writer.write(b"partial")
    wait_until(lambda: (sshd.root / "d").is_dir(), 10, "the directory on the target")
    time.sleep(0.3)  # a few batches go by while the file is held back (it is open for writing)
    assert not (sshd.root / "d/held.bin").exists()
    (source / "d").rename(workdir / "d-old")
    (source / "d").symlink_to(outside)
    writer.close()
    wait_until(lambda: not (sshd.root / "d").exists(), 10, "the target's d to go (the link points outside)")
    (source / "later.txt").write_text("later")
    wait_until(lambda: (sshd.root / "later.txt").exists(), 10, "later changes")
    assert_no_secret(sshd.root)


def _helper(start: str) -> str | None:
    """The sandbox's way to start a child: through the exec helper (as the image and tests/run.sh install it)
    or, without it, a preexec_fn."""
    if start == "preexec":
        return None
    helper = find_helper()
    if helper is None:
        pytest.fail(f"{HELPER} is not built beside {sys.executable}: run `bash tests/run.sh` once (it compiles it)")
    return helper


@needs_landlock
@pytest.mark.parametrize("start", ["helper", "preexec"])
def test_the_sandboxed_sender_cannot_read_through_a_symlinked_parent(
    source: Path, sshd: SshServer, workdir: Path, client_key, start: str
) -> None:
    # The bound on the race between planning and rsync: even handed a path through a symlinked parent (as
    # it would be if the swap happened after planning), the sender cannot read outside the source.
    from sidecar.ssh import SshLink, write_ssh_config
    from sidecar.targets import parse_target

    outside = secret_dir(workdir)
    (source / "d").symlink_to(outside)
    (source / "ok").mkdir()
    (source / "ok/f.txt").write_text("fine")
    runtime = workdir / "rt"
    runtime.mkdir(mode=0o700)
    config = write_ssh_config(runtime, client_key.private, sshd.known_hosts, "strict", 10)
    target = parse_target(sshd.url)
    link = SshLink(target, config, runtime / "c.sock", 10, sshd.known_hosts, client_key.private)
    sandbox = SourceSandbox(str(source), [config], helper=_helper(start))
    try:
        link.ensure()
        rsync = Rsync(str(source), target.rsync_dest(), link.rsync_shell(), "", Excludes(()), 30, sandbox.confinement)
        result = rsync.run(rsync.send_args(), b"d/id_ed25519\0ok/f.txt\0")
    finally:
        link.close()
        sandbox.close()
    assert (sshd.root / "ok/f.txt").read_text() == "fine"
    assert not (sshd.root / "d/id_ed25519").exists()
    assert "Permission denied" in result.stderr  # refused by the kernel, reported as unreadable
    assert_no_secret(sshd.root)


def test_a_file_replaced_by_an_outside_symlink_leaves_the_targets(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path
) -> None:
    outside = secret_dir(workdir)
    run_sidecar()
    (source / "photo.jpg").write_bytes(b"a real picture")
    wait_until(lambda: (sshd.root / "photo.jpg").exists(), 10, "the picture on the target")
    (source / "photo.jpg").unlink()
    (source / "photo.jpg").symlink_to(outside / "id_ed25519")
    wait_until(lambda: not os.path.lexists(sshd.root / "photo.jpg"), 10, "the old copy to go")
    (source / "fifo").write_text("was a file")
    wait_until(lambda: (sshd.root / "fifo").exists(), 10, "the file")
    (source / "fifo").unlink()
    os.mkfifo(source / "fifo")
    wait_until(lambda: not os.path.lexists(sshd.root / "fifo"), 10, "the copy of a name that is now a FIFO to go")
    assert_no_secret(sshd.root)


def test_a_full_sync_retracts_outside_symlinks_made_while_it_was_not_watching(
    source: Path, sshd: SshServer, client_key, workdir: Path
) -> None:
    outside = secret_dir(workdir)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (source / name).write_text(name)
    once = Sidecar(source, [sshd], client_key, workdir, SYNC_HTTP_ADDR="")
    assert once.run("once").returncode == 0
    (source / "a.jpg").unlink()
    (source / "a.jpg").symlink_to(outside / "id_ed25519")
    (source / "b.jpg").unlink()
    os.mkfifo(source / "b.jpg")
    proc = once.run("once")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.lexists(sshd.root / "a.jpg") and not os.path.lexists(sshd.root / "b.jpg")
    assert (sshd.root / "c.jpg").read_text() == "c.jpg"
    assert_no_secret(sshd.root)


# ----- 3. no wipe of a small site; 4. mass deletes are an operator decision ----------------------------


def fill(root: Path, n: int, prefix: str = "img") -> None:
    for i in range(n):
        (root / f"{prefix}-{i:03d}.jpg").write_bytes(os.urandom(64))


def not_ready(sidecar: Sidecar, state: str, timeout: float = 15) -> dict:
    def check() -> dict | None:
        code, doc = sidecar.readyz()
        return doc["targets"][0] if code == 503 and doc["targets"] and doc["targets"][0]["state"] == state else None

    return wait_until(check, timeout, f"state {state}")  # type: ignore[return-value]


def test_a_source_that_lost_most_files_does_not_wipe_a_small_site(source: Path, sshd: SshServer, run_sidecar) -> None:
    # 60 uploads, far below SYNC_MAX_DELETE=1000: all but a few vanish (a half-restored backup).
    fill(source, 60)
    sidecar = run_sidecar()
    for i in range(55):
        (source / f"img-{i:03d}.jpg").unlink()
    target = not_ready(sidecar, "delete_guard")
    assert "SYNC_MAX_DELETE_PERCENT=10" in target["message"]
    time.sleep(0.5)  # more batches could delete; none may
    assert len(list(sshd.root.glob("img-*.jpg"))) == 60


def test_a_deleted_directory_counts_every_file_below_it(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path
) -> None:
    # Regression: a directory moved away is one event and counted 1; rsync then deleted up to the limit
    # and stopped, although nothing should have been deleted at all.
    (source / "2019").mkdir()
    fill(source / "2019", 30)
    fill(source, 400, "keep")
    sidecar = run_sidecar(SYNC_MAX_DELETE="10")
    (source / "2019").rename(workdir / "2019-moved-away")
    target = not_ready(sidecar, "delete_guard")
    assert "would delete 31 paths, more than SYNC_MAX_DELETE=10" in target["message"]
    assert len(list((sshd.root / "2019").iterdir())) == 30


def test_a_directory_replaced_by_a_file_is_a_counted_delete(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path
) -> None:
    # Regression: a directory moved away and a file written under its name is one changed path, planned as a
    # send; the send's --force deleted the directory and all 30 files below it on the target to make way,
    # uncounted and past the guard (and past SYNC_DELETE=false): one year of uploads per changed name.
    (source / "2019").mkdir()
    fill(source / "2019", 30)
    (source / "small").mkdir()
    fill(source / "small", 3)
    fill(source, 400, "keep")
    sidecar = run_sidecar(SYNC_MAX_DELETE="10")
    full = lambda: sidecar.metric("upsync_syncs_total", kind="full")  # noqa: E731
    # Within the limits the replacement goes through: counted by a batch (the move seen on its own) or by
    # the full sync the send asks for (the move and the write seen together).
    (source / "small").rename(workdir / "small-moved-away")
    (source / "small").write_text("a file now")
    wait_until(lambda: (sshd.root / "small").is_file(), 15, "small/ replaced by a file")
    fulls = full()
    # Over them, nothing is deleted.
    (source / "2019").rename(workdir / "2019-moved-away")
    (source / "2019").write_text("a file now")
    wait_until(
        lambda: full() > fulls or not (sshd.root / "2019").is_dir(), 15, "the full sync that counts the directory"
    )
    assert (sshd.root / "2019").is_dir(), "the directory was deleted on the target, uncounted"
    target = not_ready(sidecar, "delete_guard")
    assert "more than SYNC_MAX_DELETE=10" in target["message"]
    assert len(list((sshd.root / "2019").iterdir())) == 30


@pytest.mark.parametrize(
    ("settings", "kept", "why"),
    [
        ({"SYNC_DELETE": "false"}, "", "deletes are off (SYNC_DELETE=false)"),
        # Review finding: a directory holding an excluded file (never deleted) stays in the way even for a
        # deleting full sync; each later write of the file asked for another full sync of the whole tree.
        ({"SYNC_EXCLUDE": "*.tmp"}, "keep.tmp", "the target keeps something below it that is never deleted"),
    ],
    ids=["deletes-off", "excluded-below"],
)
def test_a_directory_in_the_way_that_must_stay_costs_one_full_sync(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path, settings: dict[str, str], kept: str, why: str
) -> None:
    (source / "2019").mkdir()
    fill(source / "2019", 5)
    sidecar = run_sidecar(**settings)
    if kept:
        (sshd.root / "2019" / kept).write_text("the target's own, excluded")
    full = lambda: sidecar.metric("upsync_syncs_total", kind="full")  # noqa: E731
    (source / "2019").rename(workdir / "2019-moved-away")
    (source / "2019").write_text("a file now")
    wait_until(lambda: why in sidecar.logs(), 15, "the reason in the log")
    fulls = full()
    for i in range(3):  # a plugin rewriting the file: each batch is told "could not make way" again
        batches = sidecar.metric("upsync_syncs_total", kind="batch")
        (source / "2019").write_text(f"rewritten {i}")
        wait_until(lambda b=batches: sidecar.metric("upsync_syncs_total", kind="batch") > b, 10, "the rewrite's batch")
    (source / "later.jpg").write_text("still replicating")
    wait_until(lambda: (sshd.root / "later.jpg").exists(), 10, "a later upload")  # after any full sync asked for
    assert full() == fulls == 2
    # Deletes off: all of it stays. Excluded file below: the full sync deleted the rest, which the source lost.
    assert (sshd.root / "2019").is_dir() and len(list((sshd.root / "2019").iterdir())) == (1 if kept else 5)
    assert sidecar.logs().count(why) == 1
    sidecar.wait_ready(5)


def test_plan_shows_and_approve_lets_the_next_full_sync_delete(source: Path, sshd: SshServer, run_sidecar) -> None:
    fill(source, 60)
    sidecar = run_sidecar()
    for i in range(50):
        (source / f"img-{i:03d}.jpg").unlink()  # a legitimate media clean-up
    not_ready(sidecar, "delete_guard")
    plan = sidecar.run("plan")
    assert plan.returncode == 0, plan.stderr
    # 62 entries on the target: the root, seed.txt and the 60 pictures.
    assert "would send 0 files (0 bytes) and delete 50 paths (of 62 on the target: 81%)" in plan.stdout
    shown = [ln.split()[-1] for ln in plan.stdout.splitlines() if ln.startswith("  delete ")]
    assert len(shown) == 20 and all(n.startswith("img-0") and int(n[4:7]) < 50 for n in shown), plan.stdout
    assert "  ... and 30 more to delete" in plan.stdout
    assert "the delete guard refuses this" in plan.stdout and "approve 50" in plan.stdout
    plan_json = json.loads(sidecar.run("plan", "--json").stdout)
    assert plan_json["targets"][0]["delete"] == 50 and not plan_json["targets"][0]["guard_allows"]
    assert len(list(sshd.root.glob("img-*.jpg"))) == 60  # plan is a dry run
    too_few = sidecar.run("approve", "10")
    assert too_few.returncode == 0
    wait_until(lambda: "more than the 10 approved" in str(sidecar.readyz()[1]), 15, "an approval too small refused")
    assert len(list(sshd.root.glob("img-*.jpg"))) == 60
    ok = sidecar.run("approve", "50")
    assert ok.returncode == 0 and "may delete up to 50 paths" in ok.stdout
    sidecar.wait_ready(20)
    assert sorted(p.name for p in sshd.root.glob("img-*.jpg")) == [f"img-{i:03d}.jpg" for i in range(50, 60)]
    assert "deleting with the operator's approval" in sidecar.logs()


def test_approve_without_a_daemon_says_what_to_do(source: Path, sshd: SshServer, client_key, workdir: Path) -> None:
    proc = Sidecar(source, [sshd], client_key, workdir).run("approve", "5")
    assert proc.returncode == 1
    assert proc.stderr.startswith("upsync: no running upsync daemon of uid 0 replicates")
    assert "Traceback" not in proc.stderr
    bad = Sidecar(source, [sshd], client_key, workdir).run("approve", "lots")
    assert bad.returncode == 2 and "must be a whole number of deletes" in bad.stderr


# ----- 5. excluded directories stay excluded --------------------------------------------------------


def test_excluded_directories_stay_excluded_in_batches_and_full_syncs(
    source: Path, sshd: SshServer, run_sidecar
) -> None:
    (sshd.root / "woocommerce_uploads").mkdir()
    (sshd.root / "woocommerce_uploads/on-target-only.pdf").write_text("kept: excluded paths are never deleted")
    sidecar = run_sidecar(SYNC_EXCLUDE="/woocommerce_uploads/,/cache/", SYNC_FULL_SYNC_INTERVAL="2")
    (source / "cache/sub").mkdir(parents=True)
    (source / "cache/sub/x.jpg").write_text("x")
    (source / "woocommerce_uploads").mkdir()
    (source / "woocommerce_uploads/order-1.pdf").write_text("private")
    (source / "public.jpg").write_text("public")
    wait_until(lambda: (sshd.root / "public.jpg").exists(), 10, "the public file")
    full = sidecar.metric("upsync_syncs_total", kind="full", status="success")
    wait_until(lambda: sidecar.metric("upsync_syncs_total", kind="full", status="success") > full, 15, "a reconcile")
    assert not (sshd.root / "cache").exists()
    assert not (sshd.root / "woocommerce_uploads/order-1.pdf").exists()
    assert (sshd.root / "woocommerce_uploads/on-target-only.pdf").exists()


# ----- 6. nothing kills the daemon ------------------------------------------------------------------


def test_a_directory_replaced_by_a_file_converges(source: Path, sshd: SshServer, run_sidecar) -> None:
    # Regression: "d/f" under a d that is a file now was planned as a delete of d/f: rsync failed with
    # "Not a directory" (23), a partial retry, re-planned identically forever.
    sidecar = run_sidecar()
    (source / "d").mkdir()
    for i in range(3):
        (source / f"d/f{i}").write_text(str(i))
    wait_until(lambda: (sshd.root / "d/f2").exists(), 10, "the directory on the target")
    shutil.rmtree(source / "d")
    (source / "d").write_text("a file now")
    assert_converges(source, sshd.root, 15)
    assert (sshd.root / "d").read_text() == "a file now"
    sidecar.wait_ready(10)
    assert sidecar.metric("upsync_failures_total", reason="partial") == 0


# ----- 7. small ones ---------------------------------------------------------------------------------


def test_http_on_ipv6_any_address(source: Path, sshd: SshServer, run_sidecar) -> None:
    # Regression: "[::]:port" was accepted but the server listened on IPv4 only.
    import socket
    import urllib.request

    from tests.sshd import free_port

    port = free_port()
    sidecar = run_sidecar(ready=False, SYNC_HTTP_ADDR=f"[::]:{port}")
    sidecar.port = port

    def v6() -> bool:
        try:
            with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_until(v6, 15, "/healthz over IPv6")
    assert socket.has_ipv6
    sidecar.wait_ready()  # and over IPv4 (127.0.0.1) on the same dual-stack socket


def test_text_logs_escape_control_characters_in_names(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    name = "fake\n2026-12-02T00:00:00.000Z INFO    synced \x1b[2J"
    (source / name).write_bytes(b"x")
    os.mkfifo(source / (name + "-fifo"))  # a skipped path is logged with its name
    wait_until(lambda: "not replicated" in sidecar.logs(), 10, "the skipped path logged")
    line = next(ln for ln in sidecar.logs().splitlines() if "not replicated" in ln)
    assert "\\n2026-12-02T00:00:00.000Z" in line and "\\x1b[2J" in line
    assert "\x1b" not in sidecar.logs()
    assert not any(ln.startswith("2026-12-02T00:00:00.000Z") for ln in sidecar.logs().splitlines())
    wait_until(lambda: tree(sshd.root).get(name) == b"x", 15, "the file itself on the target")


# ----- 2. full syncs delete what they must ------------------------------------------------------------


def test_top_level_names_rsync_would_read_as_comments(source: Path, sshd: SshServer, run_sidecar) -> None:
    # Regression (found by the compatibility matrix): rsync reads a --files-from entry beginning with "#" or ";"
    # as a comment, even NUL-separated: a top-level "#1.jpg" was neither sent nor deleted by batches.
    run_sidecar()
    for name in ("#1.jpg", ";2.jpg", "# 3.jpg"):
        (source / name).write_text(name)
    assert_converges(source, sshd.root, 15)
    (source / "#1.jpg").unlink()
    (source / ";2.jpg").rename(source / ";renamed.jpg")
    assert_converges(source, sshd.root, 15)


@needs_landlock
@pytest.mark.parametrize("start", ["helper", "preexec"])
def test_the_sandbox_follows_a_rewritten_system_file(tmp_path: Path, start: str) -> None:
    # Landlock rules name inodes: /etc/passwd rewritten by usermod (a new inode) fell out of the sandbox, and
    # every later ssh of the running daemon failed ("No user exists for uid"). Rebuilt when a named file is replaced.

    src = tmp_path / "src"
    src.mkdir()
    extra = tmp_path / "ssh_config"
    extra.write_text("one\n")
    sandbox = SourceSandbox(str(src), [extra], helper=_helper(start))

    def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        how = sandbox.confinement()
        return subprocess.run(how.argv(argv), capture_output=True, pass_fds=how.pass_fds, preexec_fn=how.preexec_fn)

    try:
        read = ["cat", str(extra)]
        assert run(read).stdout == b"one\n"
        replacement = tmp_path / "ssh_config.new"
        replacement.write_text("two\n")
        replacement.rename(extra)  # as usermod writes /etc/passwd: a new file renamed over the old one
        # Compared at most every RECHECK_S: within it a run may still see the old ruleset (and fail, and retry).
        wait_until(lambda: run(read).stdout == b"two\n", RECHECK_S + 5, "the sandbox rebuilt for the new file")
        secret = tmp_path / "outside"
        secret.write_text("no")
        refused = run(["cat", str(secret)])
        assert refused.returncode != 0 and refused.stdout == b"" and b"Permission denied" in refused.stderr
    finally:
        sandbox.close()


def test_the_exec_helper_runs_nothing_it_cannot_confine(tmp_path: Path) -> None:
    # A descriptor that is not a Landlock ruleset (or no descriptor): exit 126, the program never runs.
    helper = _helper("helper")
    assert helper is not None
    marker = tmp_path / "ran"
    touch = ["touch", str(marker)]
    for argv, fds in (([helper, "0", *touch], ()), ([helper, "x", *touch], ()), ([helper, "5"], ())):
        proc = subprocess.run(argv, capture_output=True, text=True, pass_fds=fds, stdin=subprocess.DEVNULL)
        assert proc.returncode == 126, (argv, proc)
        assert proc.stderr.startswith(("upsync-landlock: ", "usage: upsync-landlock")), proc.stderr
    assert not marker.exists()
