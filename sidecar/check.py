"""``python -m sidecar check``: is everything in place? One line per check, exit 0 (all ok) or 1.

For each target it connects with the pinned host key and proves the account is writable the way
the daemon writes: it sends a probe file with rsync and deletes it again.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TextIO

from .config import Config, ConfigError, check_known_hosts, check_runtime_dir, check_source, check_ssh_key
from .daemon import Runtime, resolve
from .rsync import Rsync, classify
from .ssh import SshError
from .targets import Target

__all__ = ["run_checks"]


def _line(out: TextIO, ok: bool, what: str, detail: str) -> bool:
    out.write(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}\n")
    out.flush()
    return ok


def _probe_target(cfg: Config, runtime: Runtime, target: Target) -> str:
    """Connect, send a probe file, delete it. Returns a description; raises RuntimeError on failure."""
    link = runtime.link(cfg, target)
    start = time.monotonic()
    try:
        try:
            link.ensure()
        except SshError as exc:
            raise RuntimeError(str(exc)) from None
        # In the private runtime directory: with a read-only root there may be no /tmp at all.
        with tempfile.TemporaryDirectory(prefix="check-", dir=runtime.dir) as tmp:
            name = f".upsync-check-{os.getpid()}-{int(time.time())}"
            probe = os.path.join(tmp, name)
            with open(probe, "w", encoding="ascii") as fh:
                fh.write("upsync check probe; safe to delete\n")
            rsync = Rsync(tmp, target.rsync_dest(), link.rsync_shell(), cfg.chmod, (), cfg.io_timeout_s)
            for step, delete in (("write", False), ("delete", True)):
                if delete:
                    os.unlink(probe)
                for _ in range(20):  # another rsync holding the rrsync lock is worth a short wait
                    result = rsync.run(rsync.batch_args(delete, 1), os.fsencode(name) + b"\0")
                    outcome = classify(result.returncode, result.stderr)
                    if outcome.reason != "busy":
                        break
                    time.sleep(0.25)
                if outcome.kind not in ("ok", "vanished"):
                    raise RuntimeError(f"connected, but the probe {step} failed ({outcome.reason}): {outcome.message}")
    finally:
        link.close()
    ms = round((time.monotonic() - start) * 1000)
    return f"connected (host key pinned), wrote and deleted a probe file ({ms} ms)"


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
    ]
    files_ok = True
    for what, fn in checks:
        try:
            ok &= _line(out, True, what, fn(cfg))
        except ConfigError as exc:
            files_ok = ok = _line(out, False, what, str(exc))
    if not files_ok and not (cfg.ssh_key_file.is_file() and os.access(cfg.ssh_key_file, os.R_OK)):
        _line(out, False, "targets", "not checked: no usable ssh key")
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
    return 0 if ok else 1
