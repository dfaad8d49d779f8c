"""Helpers of the fault-injection suite: process trees from /proc, RSS, mounts, sysctls, bursts, wrapped daemons."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO, Sidecar, tree, tree_diff
from tests.sshd import KeyPair, SshServer, wait_until

__all__ = [
    "PrefixedSidecar",
    "as_user",
    "burst",
    "converge_all",
    "count_entries",
    "descendants",
    "in_user_namespace",
    "kill_pids",
    "log_lines",
    "names",
    "rss_kb",
    "rsync_children",
    "ssh_masters",
    "sysctl",
    "tmpfs",
    "umount",
    "wait_synced",
]


# ----- processes ---------------------------------------------------------------------------------


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                out[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), read from /proc."""
    ppids = _ppids()
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        kids = [p for p, pp in ppids.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def names(pids: list[int]) -> list[str]:
    """``argv[0]`` (plus ``-M`` for an ssh master) of each process still alive."""
    out = []
    for pid in pids:
        cmd = _cmdline(pid)
        if cmd and cmd[0]:
            out.append(os.fsdecode(cmd[0]) + (" -M" if b"-M" in cmd else ""))
    return out


def ssh_masters(pid: int) -> list[int]:
    """The daemon's ``ssh -M`` children (its persistent connections)."""
    ppids = _ppids()
    return [p for p, pp in ppids.items() if pp == pid and (c := _cmdline(p)) and c[0] == b"ssh" and b"-M" in c]


def rsync_children(pid: int) -> list[int]:
    ppids = _ppids()
    return [p for p, pp in ppids.items() if pp == pid and (c := _cmdline(p)) and c[0] == b"rsync"]


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> int:
    """Signal the given processes (ones this test started, directly or through the daemon); returns how many lived."""
    alive = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            alive += 1
    return alive


def rss_kb(pid: int) -> int:
    """Resident set size of one process (VmRSS, kB); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ----- the daemon, wrapped -----------------------------------------------------------------------


class PrefixedSidecar(Sidecar):
    """The daemon started through a wrapper command (a user namespace, another uid).

    The wrapper must ``exec`` the daemon, so ``proc.pid`` is the daemon itself (signals, /proc, RSS).
    """

    def __init__(self, prefix: list[str], *args: object, **env: str) -> None:
        super().__init__(*args, **env)  # type: ignore[arg-type]
        self.prefix = prefix

    def start(self, *args: str) -> PrefixedSidecar:
        self._fh = open(self.log, "ab")  # noqa: SIM115 (kept open for the process' lifetime)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "sidecar", *args],
            cwd=REPO,
            env=self.env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        return self


def in_user_namespace(max_watches: int) -> list[str]:
    """A wrapper that runs the daemon in a new user namespace with its own inotify watch limit.

    ``/proc/sys/user/max_inotify_watches`` of a child user namespace is that namespace's level of the
    same per-user accounting ``fs.inotify.max_user_watches`` sets for the host (the init namespace):
    a watch is charged at every level up to the init namespace, so lowering it here limits only the
    daemon, never the other processes on this machine.
    """
    script = f'echo {int(max_watches)} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--", "sh", "-c", script, "sh"]


def as_user(name: str) -> list[str]:
    """A wrapper that runs the daemon as ``name`` (no capabilities, no supplementary groups)."""
    return ["setpriv", f"--reuid={name}", f"--regid={pwd.getpwnam(name).pw_gid}", "--clear-groups", "--"]


def chown_tree(root: Path, user: str) -> None:
    """Give ``root`` and everything below it to ``user``; a symlink itself, never what it points to (a test
    tree holds links to /root and /etc)."""
    entry = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)
    os.lchown(root, entry.pw_uid, entry.pw_gid)


def user_daemon(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar], **env: str
) -> PrefixedSidecar:
    """The daemon as the unprivileged target account (root reads everything, so "unreadable" needs another
    uid): the source given to that uid, a private copy of the key, a runtime directory of its own. Not started;
    registered with ``sidecars`` (killed after the test)."""
    user = sshd.user
    chown_tree(source, user)
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
        HOME=pwd.getpwnam(user).pw_dir,
        **env,
    )
    sidecars.append(sidecar)
    return sidecar


def wait_synced(sidecar: Sidecar, timeout: float = 30) -> dict:
    """/readyz 200 *and* every target synced once.

    Stricter than ``Sidecar.wait_ready``: at start-up /readyz can answer 200 with no target at all (before
    the workers exist, see test_fault_readiness.py), and a scenario must not start from that state.
    """

    def synced() -> dict | None:
        sidecar.check_alive()
        code, doc = sidecar.readyz()
        targets = doc.get("targets") or []
        return doc if code == 200 and targets and all(t.get("state") == "ok" for t in targets) else None

    return wait_until(synced, timeout, "the first full sync to every target")  # type: ignore[return-value]


def log_lines(sidecar: Sidecar, needle: str) -> list[str]:
    return [line for line in sidecar.logs().splitlines() if needle in line]


# ----- file system -------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, owner: str | None = None) -> Iterator[Path]:
    """A tmpfs mounted on ``path`` for the block; unmounted (lazily if busy) whatever happens."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        if owner:
            shutil.chown(path, owner, owner)
        yield path
    finally:
        umount(path)


def umount(path: Path) -> None:
    """Unmount ``path``; a lazy unmount if a process still holds it (nothing is left mounted)."""
    if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def sysctl(path: str, value: int) -> Iterator[int]:
    """Set a /proc/sys knob for the block and restore it in any case; yields the old value."""
    with open(path, encoding="ascii") as fh:
        old = int(fh.read().strip())
    with open(path, "w", encoding="ascii") as fh:
        fh.write(str(value))
    try:
        yield old
    finally:
        with open(path, "w", encoding="ascii") as fh:
            fh.write(str(old))


def burst(
    source: Path, start: int, stop: int, dirs: int = 50, size: int = 1024, pause_every: int = 0, pause: float = 0.01
) -> None:
    """Write files ``start``..``stop`` spread over ``dirs`` directories (made when missing)."""
    for i in range(start, stop):
        d = source / f"b-{i % dirs:02d}"
        if i < start + dirs:
            d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(size))
        if pause_every and i % pause_every == 0:
            time.sleep(pause)


def converge_all(pairs: dict[str, tuple[Path, Path]], timeout: float, interval: float = 0.5) -> dict[str, float]:
    """Wait until every (source, target) pair is byte-identical; returns the seconds each took.

    One loop for all pairs, so each figure is measured from the same start (not after the previous pair).
    """
    start = time.monotonic()
    done: dict[str, float] = {}

    def check() -> bool:
        for name, (src, dst) in pairs.items():
            if name not in done and not tree_diff(src, dst):
                done[name] = round(time.monotonic() - start, 1)
        return len(done) == len(pairs)

    try:
        wait_until(check, timeout, "convergence", interval=interval)
    except TimeoutError:
        late = {n: tree_diff(*pairs[n])[:5] for n in pairs if n not in done}
        raise AssertionError(f"not converged after {timeout} s: {late}") from None
    return done


def count_entries(root: Path) -> int:
    """Files, directories and links under ``root`` (what a byte-identical comparison checked)."""
    return len(tree(root))
