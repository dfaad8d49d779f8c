"""Checks of the host and of every target: ``python -m sidecar check`` (one line per check, exit 0 when all
pass, 1 otherwise), and the pre-flight checks the daemon makes before it starts (each raises
:class:`~sidecar.config.ConfigError`, exit 2).

For each target ``check`` takes the exact path batches take: it connects with the pinned host key, finds
out what the receiver's rsync takes (and names its version when the receiver does), sends a probe file the
way a batch sends, and removes it the way a batch removes (counted first, then deleted). A target that
cannot do that is a FAIL naming the cause. When every target passes, a running daemon of the same source is
told to try the targets it had given up on (``fatal``) again.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .config import Config, ConfigError, invalid
from .control import ControlError, find_daemon, request
from .daemon import Runtime, resolve
from .filters import Excludes
from .hooks import check_hooks
from .plan import files_from
from .rsync import Rsync
from .targets import Target
from .transport import TransferError, Transport

__all__ = [
    "check_known_hosts",
    "check_runtime_dir",
    "check_source",
    "check_ssh_key",
    "preflight",
    "run_checks",
]


def check_source(cfg: Config) -> str:
    """Check that the source is a readable directory; returns a short description.

    Raises:
        ConfigError: it is missing, not a directory, or not readable by this process.
    """
    src = str(cfg.source)
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise invalid(
            "SYNC_SOURCE", src, "an existing directory (nothing is there: mount the uploads volume or fix the path)"
        ) from None
    except OSError as exc:
        raise invalid("SYNC_SOURCE", src, f"a directory this process can reach ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise invalid("SYNC_SOURCE", src, "a directory, not a file")
    try:
        os.fsencode(src).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("SYNC_SOURCE", src, "a path in UTF-8 (watchfiles cannot watch any other)") from None
    if not os.access(src, os.R_OK | os.X_OK):
        raise invalid(
            "SYNC_SOURCE",
            src,
            f"readable by uid {os.getuid()} (run as the uploads' owner or make the directory readable)",
        )
    return f"{src} is a readable directory (device {st.st_dev})"


def _key_load_problem(path: str) -> str:
    """Why ssh could not use the key ('' if it can): asks ``ssh-keygen -y`` to derive the public key.

    The key goes through a pipe, so its file's own (possibly too open) mode does not get in the way.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 16)
        proc = subprocess.run(
            ["ssh-keygen", "-y", "-P", "", "-f", "/dev/stdin"], input=data, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""  # no ssh-keygen: leave it to ssh
    if proc.returncode == 0:
        return ""
    lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else f"ssh-keygen exited {proc.returncode}").replace('"/dev/stdin"', "it")


def check_runtime_dir(cfg: Config) -> str:
    """Check that the private runtime directory can be made where ``SYNC_RUNTIME_DIR`` says."""
    base = str(cfg.runtime_dir) if cfg.runtime_dir else tempfile.gettempdir()
    if not os.path.isdir(base):
        raise invalid("SYNC_RUNTIME_DIR", base, "an existing directory (mount a tmpfs there, or leave it empty)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise invalid("SYNC_RUNTIME_DIR", base, f"writable by uid {os.getuid()} (a tmpfs with mode 1777 will do)")
    return f"{base} is writable"


def check_ssh_key(cfg: Config) -> str:
    """Check that the private key exists and is readable; returns a short description."""
    path = str(cfg.ssh_key_file)
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            head = fh.read(64)
    except FileNotFoundError:
        raise invalid(
            "SYNC_SSH_KEY_FILE",
            path,
            "an existing private key file (mount it, or set SYNC_SSH_KEY_FILE to where it is)",
        ) from None
    except IsADirectoryError:
        raise invalid("SYNC_SSH_KEY_FILE", path, "a private key file, not a directory") from None
    except PermissionError:
        raise invalid(
            "SYNC_SSH_KEY_FILE", path, f"readable by uid {os.getuid()} (chown it to that user, mode 0600)"
        ) from None
    if b"PRIVATE KEY" not in head:
        raise invalid(
            "SYNC_SSH_KEY_FILE", path, "a private key (this file does not start like one; did you give the .pub file?)"
        )
    problem = _key_load_problem(path)
    if problem:
        raise invalid("SYNC_SSH_KEY_FILE", path, f"a private key ssh can load without a passphrase ({problem})")
    note = "" if not st.st_mode & 0o077 else f"; mode {st.st_mode & 0o777:04o} is too open, a private copy is used"
    return f"{path} is a private key{note}"


def check_known_hosts(cfg: Config) -> str:
    """Check the known_hosts file; with ``accept-new`` it may be missing but must be creatable."""
    path = cfg.ssh_known_hosts_file
    if cfg.ssh_host_key_policy == "accept-new":
        probe = path if os.path.lexists(path) else path.parent
        if not os.access(probe, os.W_OK):
            raise invalid(
                "SYNC_SSH_KNOWN_HOSTS_FILE",
                str(path),
                "writable when SYNC_SSH_HOST_KEY_POLICY=accept-new (new host keys are written to it)",
            )
        return f"{path} (accept-new: first keys are written here)"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError:
        raise invalid(
            "SYNC_SSH_KNOWN_HOSTS_FILE",
            str(path),
            "an existing known_hosts file with the targets' "
            "host keys (ssh-keyscan HOST >> FILE, after checking the fingerprint)",
        ) from None
    except OSError as exc:
        raise invalid("SYNC_SSH_KNOWN_HOSTS_FILE", str(path), f"a readable file ({exc.strerror})") from None
    return f"{path} pins {len(lines)} host key(s)"


def preflight(cfg: Config) -> None:
    """The checks the daemon makes before it starts (raises :class:`ConfigError`)."""
    check_source(cfg)
    check_ssh_key(cfg)
    check_known_hosts(cfg)
    check_runtime_dir(cfg)
    check_hooks(cfg)


def _line(out: TextIO, ok: bool, what: str, detail: str) -> bool:
    out.write(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}\n")
    out.flush()
    return ok


def _probe_target(cfg: Config, runtime: Runtime, target: Target) -> str:
    """Connect, learn the receiver, send a probe file and remove it as batches do. Raises RuntimeError."""
    link = runtime.link(cfg, target)
    start = time.monotonic()
    try:
        # In the private runtime directory: with a read-only root there may be no /tmp at all.
        with tempfile.TemporaryDirectory(prefix="check-", dir=runtime.dir) as tmp:
            name = f".upsync-check-{os.getpid()}-{int(time.time())}"
            rsync = Rsync(tmp, target.rsync_dest(), link.rsync_shell(), cfg.chmod, Excludes(()), cfg.io_timeout_s)
            transport = Transport(target, link, rsync, runtime.dir)
            step = "connect"
            try:
                transport.connect()
                receiver = transport.receiver
                step = "send (as batches send)"
                with open(os.path.join(tmp, name), "w", encoding="ascii") as fh:
                    fh.write("upsync check probe; safe to delete\n")
                transport.send(files_from([name]))
                step = "delete (as batches delete)"
                os.unlink(os.path.join(tmp, name))
                count = transport.count_removals([name], [])
                if count != 1:
                    raise RuntimeError(f"connected, but the probe delete would remove {count} paths, not 1")
                transport.remove([name], [], max_delete=1)
            except TransferError as exc:
                where = "" if step == "connect" else f"connected, but the probe {step} failed: "
                raise RuntimeError(f"{where}{exc}") from None
    finally:
        link.close()
    ms = round((time.monotonic() - start) * 1000)
    info = receiver.describe() if receiver else "receiver unknown"
    return f"connected (host key pinned), sent and deleted a probe file as batches do ({ms} ms); {info}"


def _retry_running_daemon(cfg: Config, out: TextIO) -> None:
    base = Path(str(cfg.runtime_dir) if cfg.runtime_dir else tempfile.gettempdir())
    try:
        answer = request(find_daemon(base, os.path.realpath(cfg.source)), {"cmd": "retry"})
    except ControlError:
        return  # no daemon running here: nothing to tell
    if answer.get("retried"):
        _line(out, True, "daemon", f"asked to try again: {', '.join(answer['retried'])}")


def run_checks(cfg: Config, out: TextIO = sys.stdout) -> int:
    """Run every check, print one line each.

    Returns:
        0 when all passed, 1 otherwise.
    """
    ok = _line(out, True, "config", f"{len(cfg.targets)} target(s), mode {cfg.mode}")
    checks: list[tuple[str, Callable[[Config], str]]] = [
        ("source", check_source),
        ("ssh key", check_ssh_key),
        ("known_hosts", check_known_hosts),
        ("runtime dir", check_runtime_dir),
        *([("hooks", check_hooks)] if cfg.hook_command or cfg.webhook_url else []),
    ]
    failed: set[str] = set()
    for what, fn in checks:
        try:
            ok &= _line(out, True, what, fn(cfg))
        except ConfigError as exc:
            ok = _line(out, False, what, str(exc))
            failed.add(what)
    if failed & {"ssh key", "runtime dir"}:
        _line(
            out,
            False,
            "targets",
            f"not checked: fix the {' and '.join(sorted(failed & {'ssh key', 'runtime dir'}))} first",
        )
        return 1
    try:
        runtime = Runtime(cfg)
    except OSError as exc:
        _line(out, False, "runtime dir", f"cannot make a private directory: {exc} (check SYNC_RUNTIME_DIR)")
        return 1
    try:
        for target in cfg.targets:
            try:
                concrete = resolve(target)
            except OSError as exc:
                ok = _line(out, False, f"target {target.name}", f"cannot resolve {target.host}: {exc}")
                continue
            if not concrete:
                ok = _line(out, False, f"target {target.name}", f"{target.host} resolves to no address")
            for each in concrete:
                try:
                    ok &= _line(out, True, f"target {each.name}", _probe_target(cfg, runtime, each))
                except (RuntimeError, OSError) as exc:
                    ok = _line(out, False, f"target {each.name}", str(exc))
    finally:
        runtime.close()
    if ok:
        _retry_running_daemon(cfg, out)
    return 0 if ok else 1
