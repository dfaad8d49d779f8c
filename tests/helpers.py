"""Test helpers: run the real daemon as a subprocess, compare trees, read its HTTP endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.sshd import KeyPair, SshServer, free_port, kill_tree, wait_until

__all__ = ["Sidecar", "assert_converges", "tree", "tree_diff", "wait_until"]

REPO = Path(__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, bytes | str]:
    """relative path -> file bytes, ``"dir"`` or ``"link:<target>"``; special files as their type."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, os.fsencode(root)))
            if os.path.islink(full):
                out[rel] = "link:" + os.fsdecode(os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = "dir"
            elif os.path.isfile(full):
                try:
                    with open(full, "rb") as fh:
                        out[rel] = fh.read()
                except PermissionError:
                    out[rel] = "unreadable"
                except FileNotFoundError:
                    # renamed away while we walked (rsync's temp file): a difference, so callers look again
                    out[rel] = "vanished"
            else:
                out[rel] = "special"
    return out


def tree_diff(src: Path, dst: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Differences between two trees (empty when byte-identical)."""
    a, b = tree(src), tree(dst)
    diff = []
    for path in sorted(set(a) | set(b)):
        if any(path == i or path.startswith(i + "/") for i in ignore):
            continue
        if path not in b:
            diff.append(f"missing on target: {path!r}")
        elif path not in a:
            diff.append(f"extra on target: {path!r}")
        elif a[path] != b[path]:
            diff.append(f"differs: {path!r}")
    return diff


class Sidecar:
    """``python -m sidecar`` as a real subprocess against a test sshd."""

    def __init__(self, source: Path, targets: list[SshServer] | str, key: KeyPair, workdir: Path, **env: str) -> None:
        self.port = free_port()
        self.log = workdir / f"sidecar-{self.port}.log"
        if isinstance(targets, str):
            target_spec, known = targets, env.pop("SYNC_SSH_KNOWN_HOSTS_FILE", "")
        else:
            target_spec = ",".join(t.url for t in targets)
            known_file = workdir / f"known_hosts-{self.port}"
            known_file.write_text("".join(t.known_hosts_line() + "\n" for t in targets))
            known = str(known_file)
        self.env = {
            "PATH": os.environ["PATH"],
            "SYNC_SOURCE": str(source),
            "SYNC_TARGETS": target_spec,
            "SYNC_SSH_KEY_FILE": str(key.private),
            "SYNC_SSH_KNOWN_HOSTS_FILE": known,
            "SYNC_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "SYNC_ENV_FILE": "",
            "SYNC_RETRY_MAX_S": "2",
            "SYNC_SHUTDOWN_GRACE_S": "10",
        }
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Sidecar:
        self._fh = open(self.log, "ab")  # noqa: SIM115 (kept open for the process' lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args], cwd=REPO, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT
        )
        return self

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command to completion (``once``, ``check``)."""
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def readyz(self) -> tuple[int, dict]:
        code, body = self.get("/readyz")
        return code, (json.loads(body) if body else {})

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lbl = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, timeout: float = 30) -> dict:
        def ready() -> dict | None:
            self.check_alive()
            code, doc = self.readyz()
            return doc if code == 200 else None

        return wait_until(ready, timeout, "the sidecar to be ready")  # type: ignore[return-value]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._fh.close()
        return rc

    def kill(self) -> None:
        """SIGKILL the daemon and its children (a killed daemon cannot stop its own ssh master)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait()


def assert_converges(src: Path, dst: Path, timeout: float = 20, ignore: tuple[str, ...] = ()) -> float:
    """Wait until ``dst`` is byte-identical to ``src``; returns the seconds it took, fails with the diff."""
    import time

    start = time.monotonic()
    try:
        wait_until(lambda: not tree_diff(src, dst, ignore), timeout, "convergence")
    except TimeoutError:
        diff = tree_diff(src, dst, ignore)
        raise AssertionError(f"not converged after {timeout} s; {len(diff)} differences: {diff[:10]}") from None
    return time.monotonic() - start


def require_docker(what: str, skip_variable: str, compose: bool = True) -> None:
    """Fail (not skip: CI has Docker) with one line when Docker, or the Compose plugin, cannot be used.

    Args:
        what: the suite, for the message ("the stack test").
        skip_variable: the variable that skips the suite, named in the message.
        compose: the suite needs ``docker compose`` too.
    """
    import shutil

    import pytest

    plugin = " and the Compose v2 plugin" if compose else ""
    hint = f"{what} needs Docker Engine{plugin} (set {skip_variable}=1 to skip it)"
    if shutil.which("docker") is None:
        pytest.fail(f"docker is not installed: {hint}", pytrace=False)
    checks = [["docker", "info", "--format", "{{.ServerVersion}}"]] + (
        [["docker", "compose", "version"]] if compose else []
    )
    for args in checks:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(args)}` did not answer within 30 s: {hint}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` failed ({proc.stderr.strip()[:300]}): {hint}", pytrace=False)
