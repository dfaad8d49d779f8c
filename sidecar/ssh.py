"""One persistent, multiplexed ssh connection per target (OpenSSH ControlMaster).

The master runs as a child process (``ssh -M -N``) with its socket in the daemon's private 0700
directory; each rsync then costs one ``ssh`` mux client, not a TCP handshake and key exchange.
If the master dies it is started again before the next transfer. Host keys are checked against the
pinned known_hosts file; failures are turned into one-line messages that say what to do.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from . import logs
from .targets import Target

__all__ = ["SshError", "SshLink", "describe_ssh_failure", "private_key", "write_ssh_config"]

log = logs.get("ssh")
_SETPRIV = shutil.which("setpriv")  # util-linux, in every Debian


class SshError(Exception):
    """The connection to a target could not be made.

    Attributes:
        reason: one of ``network``, ``auth``, ``host_key`` (the ``reason`` metrics label).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def private_key(key_file: Path, runtime_dir: Path) -> Path:
    """The key path to hand to ssh: the file itself, or a private 0600 copy if others can read it.

    ssh refuses a key that group or others can read ("UNPROTECTED PRIVATE KEY FILE"); secrets mounted
    by Docker or Kubernetes are often 0444/0644, so a private copy is made instead of failing.
    """
    mode = key_file.stat().st_mode & 0o777
    if not mode & 0o077:
        return key_file
    copy = runtime_dir / "id_key"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, open(key_file, "rb") as src:
        shutil.copyfileobj(src, out)
    log.warning(
        "private key is readable by others; using a private 0600 copy",
        extra={"fields": {"key": str(key_file), "mode": f"{mode:04o}", "fix": f"chmod 600 {key_file}"}},
    )
    return copy


def _quote(value: str | Path) -> str:
    text = str(value)
    return '"' + text + '"' if any(c.isspace() for c in text) else text


def write_ssh_config(runtime_dir: Path, key: Path, known_hosts: Path, policy: str, connect_timeout: int) -> Path:
    """Write the ssh client config every connection uses; ``-F`` makes ssh ignore all other configs."""
    strict = "yes" if policy == "strict" else "accept-new"
    lines = [
        f"IdentityFile {_quote(key)}",
        "IdentitiesOnly yes",
        "IdentityAgent none",
        f"UserKnownHostsFile {_quote(known_hosts)}",
        "GlobalKnownHostsFile /dev/null",
        f"StrictHostKeyChecking {strict}",
        "UpdateHostKeys no",
        "CheckHostIP no",
        "BatchMode yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        f"ConnectTimeout {connect_timeout}",
        "ConnectionAttempts 1",
        # A dead peer is noticed within ~15 s, not at the next TCP timeout.
        "ServerAliveInterval 5",
        "ServerAliveCountMax 3",
        "ControlMaster no",
        "ForwardAgent no",
        "ForwardX11 no",
        "ClearAllForwardings yes",
        "RequestTTY no",
        "Compression no",
        "LogLevel ERROR",
    ]
    path = runtime_dir / "ssh_config"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _fingerprints(target: Target, timeout: int) -> list[tuple[str, str, str]]:
    """(key type, fingerprint, known_hosts line) of the host keys the server offers now."""
    try:
        scan = subprocess.run(
            ["ssh-keyscan", "-T", str(timeout), "-p", str(target.port), target.host],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in scan.stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or line.startswith("#"):
            continue
        try:
            fp = subprocess.run(
                ["ssh-keygen", "-l", "-f", "-"],
                input=line + "\n",
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        words = fp.stdout.split()
        if len(words) >= 2:
            kind = words[-1].strip("()")
            found.append((kind, words[1], f"{target.known_hosts_name} {parts[1]} {parts[2]}"))
    order = {"ED25519": 0, "ECDSA": 1, "RSA": 2}
    return sorted(found, key=lambda f: order.get(f[0], 9))


def describe_ssh_failure(target: Target, stderr: str, known_hosts: Path, key: Path, timeout: int) -> SshError:
    """Turn ssh's stderr into an :class:`SshError` whose message says what to fix."""
    text = stderr.strip()
    where = target.known_hosts_name
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or ("Host key for" in text and "has changed" in text):
        seen = _fingerprints(target, timeout)
        offer = f"it now offers {seen[0][0]} {seen[0][1]}" if seen else "its key differs"
        return SshError(
            "host_key",
            f"host key of {where} does not match the one pinned in {known_hosts} "
            f"({offer}); if the server was re-keyed on purpose, replace its line in that file",
        )
    if "Host key verification failed" in text or "host key is known" in text:
        seen = _fingerprints(target, timeout)
        if seen:
            kind, fp, line = seen[0]
            how = f"if that is the server's fingerprint, pin it: echo '{line}' >> {known_hosts}"
            offer = f"the server offers {kind} {fp}"
        else:
            offer, how = "no key could be fetched to show", f"add its line to {known_hosts}"
        return SshError(
            "host_key",
            f"host key of {where} is not pinned in {known_hosts}; {offer}; {how} "
            "(or set SYNC_SSH_HOST_KEY_POLICY=accept-new to trust a first key)",
        )
    # Before "Permission denied": ssh says that too after it could not load the key at all.
    if "Load key" in text or "invalid format" in text or "bad permissions" in text:
        load = next((ln.strip() for ln in text.splitlines() if "Load key" in ln), _last_line(text))
        return SshError("auth", f"ssh cannot use the key {key}: {load}")
    if "Permission denied" in text or "Too many authentication failures" in text:
        # The client cannot tell why; the target's sshd log does (journalctl -u ssh, or the container's log).
        return SshError(
            "auth",
            f"{target.user}@{where} refused the key {key} ({_last_line(text)}); the target's sshd log says "
            f"which of these it is: the key is not in {target.user}'s authorized_keys (add "
            f"'command=\"/usr/bin/rrsync -wo DIR\",restrict {_public_key(key)}'), the account is locked "
            f"(\"account is locked\": usermod -p '*' {target.user}, not '!'), or authorized_keys or a directory "
            'above it has the wrong owner or mode ("bad ownership or modes": owned by root or the account, '
            "not writable by group or others)",
        )
    return SshError("network", f"cannot reach {where}: {_last_line(text) or 'ssh exited without a message'}")


def _public_key(key: Path) -> str:
    """The public half of ``key`` as an authorized_keys entry ("ssh-ed25519 AAAA..."), or a placeholder."""
    try:
        with open(key, "rb") as fh:
            proc = subprocess.run(
                ["ssh-keygen", "-y", "-P", "", "-f", "/dev/stdin"],
                stdin=fh,
                capture_output=True,
                timeout=10,
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired):
        return "<its public key>"
    words = proc.stdout.decode("ascii", "replace").split()
    return " ".join(words[:2]) if proc.returncode == 0 and len(words) >= 2 else "<its public key>"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("@@@")]
    return lines[-1][:300] if lines else ""


class SshLink:
    """The persistent connection to one target.

    Args:
        target: where to connect.
        config_file: from :func:`write_ssh_config`.
        socket: control socket path (inside the private runtime directory).
        connect_timeout: seconds for the TCP connect and handshake.
        known_hosts: for error messages.
        key: for error messages.
    """

    def __init__(
        self, target: Target, config_file: Path, socket: Path, connect_timeout: int, known_hosts: Path, key: Path
    ) -> None:
        self.target = target
        self.config_file = config_file
        self.socket = socket
        self.connect_timeout = connect_timeout
        self.known_hosts = known_hosts
        self.key = key
        self._master: subprocess.Popen[bytes] | None = None
        self._log = socket.with_suffix(".log")
        self.starts = 0

    def ssh_args(self) -> list[str]:
        """``ssh`` with every option but the user and host (rsync adds those from its destination)."""
        args = ["ssh", "-F", str(self.config_file), "-o", f"ControlPath={self.socket}", "-p", str(self.target.port)]
        if self.target.host_key_alias:
            args += ["-o", f"HostKeyAlias={self.target.host_key_alias}"]
        return args

    def rsync_shell(self) -> str:
        """The ``rsync -e`` value (rsync splits it honouring quotes)."""
        return shlex.join(self.ssh_args())

    def alive(self) -> bool:
        return self._master is not None and self._master.poll() is None and self.socket.exists()

    def ensure(self) -> bool:
        """Start the master connection unless it is up.

        Returns:
            True if a new connection was made.

        Raises:
            SshError: it could not be made; the message says why and what to do.
        """
        if self.alive():
            return False
        self.close()
        self.socket.unlink(missing_ok=True)  # a stale socket would make ssh refuse to be master
        cmd = [
            *self.ssh_args(),
            "-M",
            "-N",
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=no",
            "-l",
            self.target.user,
            self.target.host,
        ]
        if _SETPRIV:
            # Dies with the thread that started it, even when the daemon is SIGKILLed: no orphan
            # connection (and no stale lock on an rrsync target) survives the daemon.
            cmd = [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd]
        with open(self._log, "wb") as err:
            # Own session: a Ctrl-C in the terminal must not cut the link while we flush on shutdown.
            self._master = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + self.connect_timeout + 5
        while time.monotonic() < deadline:
            if self.socket.exists():
                return True
            if self._master.poll() is not None:
                break
            time.sleep(0.01)
        code = self._master.poll()
        self.close()
        stderr = self._log.read_text(encoding="utf-8", errors="replace") if self._log.exists() else ""
        if not stderr.strip():
            stderr = (
                f"no connection within {self.connect_timeout + 5} s"
                if code is None
                else f"ssh exited with status {code} before connecting"
            )
        raise describe_ssh_failure(self.target, stderr, self.known_hosts, self.key, self.connect_timeout)

    def master_pid(self) -> int | None:
        return self._master.pid if self._master is not None and self._master.poll() is None else None

    def close(self) -> None:
        """Stop the master connection (idempotent)."""
        proc, self._master = self._master, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.socket.unlink(missing_ok=True)
