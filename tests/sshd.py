"""A real OpenSSH server on 127.0.0.1 with a dedicated target account, for tests and benchmarks.

As root, the account is ``upsync-test`` (``/bin/sh`` shell: root's login shell here is slow and
would skew timings); otherwise it is the current user (an unprivileged sshd can only log its own
user in). ``authorized_keys`` forces ``rrsync -wo DIR`` with ``restrict`` by default, exactly as a
production target should; ``rrsync=False`` gives a plain shell account (the benchmark's floor).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["KeyPair", "SshServer", "free_port", "kill_tree", "locked_user", "target_user", "wait_until"]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TEST_USER = "upsync-test"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and all its descendants (sshd's per-connection children included)."""
    tree = _children()
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    for p in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def locked_user() -> str:
    """An account as ``useradd`` leaves it: "!" in its password field (locked), a /bin/sh shell (root only)."""
    name = "upsync-locked"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    subprocess.run(["usermod", "-p", "!", name], check=True)
    return name


def target_user() -> str:
    """The account ssh logs in as (created on first use when root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
    # A locked password ("!") makes sshd without PAM refuse even key logins; "*" is "no password".
    subprocess.run(["usermod", "-p", "*", "-s", "/bin/sh", TEST_USER], check=True)
    return TEST_USER


class KeyPair:
    """An ed25519 key pair in ``directory``."""

    def __init__(self, directory: Path, name: str = "id_ed25519") -> None:
        self.private = directory / name
        if not self.private.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(self.private)], check=True
            )
        self.public = Path(str(self.private) + ".pub")

    @property
    def public_text(self) -> str:
        return self.public.read_text().strip()


class SshServer:
    """One sshd on 127.0.0.1:<free port> whose account writes into ``self.root``.

    Args:
        base: a directory of its own (world-traversable: the target account must reach ``root``).
        client: the key allowed to log in.
        host_key: the server's host key.
        rrsync: force ``rrsync -wo root`` (True) or give a plain ``/bin/sh`` account (False).
        extra_keys: more ``authorized_keys`` lines.
        rrsync_cmd: the forced command's program and options before the directory (another rrsync, say
            Debian 12's, or ``-no-del``).
    """

    def __init__(
        self,
        base: Path,
        client: KeyPair,
        host_key: KeyPair,
        rrsync: bool = True,
        extra_keys: tuple[str, ...] = (),
        rrsync_cmd: str = "/usr/bin/rrsync -wo",
        user: str | None = None,
    ) -> None:
        self.base = base
        self.user = user or target_user()
        self.client = client
        self.host_key = host_key
        self.rrsync = rrsync
        self.port = free_port()
        self.root = base / "target"
        self.root.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user, self.user)
        restrict = f'command="{rrsync_cmd} {self.root}",restrict ' if rrsync else "restrict "
        self.authorized_keys = base / "authorized_keys"
        self.authorized_keys.write_text(restrict + client.public_text + "\n" + "".join(k + "\n" for k in extra_keys))
        self.authorized_keys.chmod(0o644)
        self.config = base / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key.private}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"PidFile {base / 'sshd.pid'}",
                    f"AllowUsers {self.user}",
                    "StrictModes no",  # the test tree lives under /tmp
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin no",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "MaxStartups 100:30:200",
                    "MaxSessions 100",
                    "LogLevel ERROR",
                ]
            )
            + "\n"
        )
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line() + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def known_hosts_line(self, name: str | None = None) -> str:
        host = name or f"[127.0.0.1]:{self.port}"
        kind, key = self.host_key.public_text.split()[:2]
        return f"{host} {kind} {key}"

    @property
    def url(self) -> str:
        """The target URL: ``/`` is the jail's root with rrsync; without it, the real target directory
        (never ``/``: a deleting sync there would hit the machine's root)."""
        path = "/" if self.rrsync else f"{self.root}/"
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def start(self) -> SshServer:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stderr=subprocess.PIPE)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, f"sshd on port {self.port}")
        return self

    def stop(self) -> None:
        """Kill the server and every session it holds (a real outage, not just a closed listener)."""
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def ssh_server(client: KeyPair, host_key: KeyPair, rrsync: bool = True) -> Iterator[SshServer]:
    """A started :class:`SshServer` in a fresh directory, stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="upsync-sshd-"))
    server = SshServer(base, client, host_key, rrsync=rrsync)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
