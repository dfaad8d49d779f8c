"""The command line: exit codes, one-line errors without tracebacks, `check` and `once`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import EXIT_CONFIG, cli
from tests.helpers import REPO, Sidecar, tree_diff
from tests.sshd import KeyPair, SshServer


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "SYNC_ENV_FILE": ""}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "upsync: invalid SYNC_SOURCE: must be set: a file system path"),
        (
            {"SYNC_SOURCE": "/srv", "SYNC_TARGETS": "ssh://u@h/x", "SYNC_QUIET_MS": "fast"},
            'upsync: invalid SYNC_QUIET_MS="fast": must be a whole number from 1 to 10000 (milliseconds)',
        ),
        (
            {"SYNC_SOURCE": "/nonexistent/uploads", "SYNC_TARGETS": "ssh://u@h/x"},
            'upsync: invalid SYNC_SOURCE="/nonexistent/uploads": must be an existing directory',
        ),
        (
            {"SYNC_SOURCE": "/etc/hostname", "SYNC_TARGETS": "ssh://u@h/x"},
            'upsync: invalid SYNC_SOURCE="/etc/hostname": must be a directory, not a file',
        ),
        (
            {"SYNC_SOURCE": "/tmp", "SYNC_TARGETS": "ssh://u@h/x", "SYNC_SSH_KEY_FILE": "/nonexistent/key"},
            'upsync: invalid SYNC_SSH_KEY_FILE="/nonexistent/key": must be an existing private key file',
        ),
    ],
)
def test_config_errors_exit_2_with_one_line(env: dict[str, str], expected: str) -> None:
    proc = run(**env)
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr.startswith(expected), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_flag_overrides_env(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNC_ENV_FILE", "")
    monkeypatch.setenv("SYNC_SOURCE", "/srv")
    monkeypatch.setenv("SYNC_TARGETS", "ssh://u@h/x")
    assert cli(["--quiet-ms", "0"]) == EXIT_CONFIG
    assert 'invalid SYNC_QUIET_MS="0"' in capsys.readouterr().err


def test_config_prints_generated_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["config", "--env-example"]) == 0
    assert "SYNC_QUIET_MS=20" in capsys.readouterr().out


@pytest.mark.integration
def test_check_good_target(source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    proc = Sidecar(source, [sshd], client_key, workdir).run("check")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [ln.split()[0] for ln in lines] == ["ok"] * 6
    assert lines[-1].startswith(f"ok   target ssh://{sshd.user}@127.0.0.1:{sshd.port}/: connected")
    assert "sent and deleted a probe file as batches do" in lines[-1]
    assert sorted(os.listdir(sshd.root)) == []  # the probe is gone


@pytest.mark.integration
def test_check_bad_targets(source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    known = workdir / "only_one_pinned"
    known.write_text(sshd.known_hosts_line() + "\n")
    stopped = SshServer(workdir / "down", client_key, sshd.host_key)  # never started: nothing listens
    unpinned = SshServer(workdir / "unpinned", client_key, KeyPair(workdir, "other-host")).start()
    try:
        targets = f"{sshd.url},{stopped.url},{unpinned.url}"
        proc = Sidecar(source, targets, client_key, workdir, SYNC_SSH_KNOWN_HOSTS_FILE=str(known)).run("check")
    finally:
        unpinned.stop()
    out = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert out[-3].startswith("ok   target")
    assert out[-2].startswith(f"FAIL target ssh://{stopped.user}@127.0.0.1:{stopped.port}/: cannot reach")
    assert "is not pinned in" in out[-1] and "the server offers ED25519 SHA256:" in out[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_check_missing_key(source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    proc = Sidecar(source, [sshd], client_key, workdir, SYNC_SSH_KEY_FILE="/nonexistent").run("check")
    assert proc.returncode == 1
    assert "FAIL ssh key: invalid SYNC_SSH_KEY_FILE" in proc.stdout
    assert "FAIL targets: not checked: fix the ssh key first" in proc.stdout


@pytest.mark.integration
def test_once_syncs_and_exits_with_status(source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    (source / "x.jpg").write_bytes(b"x" * 5000)
    proc = Sidecar(source, [sshd], client_key, workdir).run("once")
    assert proc.returncode == 0, proc.stderr
    assert not tree_diff(source, sshd.root)
    sshd.stop()
    proc = Sidecar(source, [sshd], client_key, workdir, SYNC_RETRY_MAX_S="1").run("once")
    assert proc.returncode == 1
    assert "cannot reach" in proc.stderr


@pytest.mark.integration
def test_health_command(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    env = {k: v for k, v in sidecar.env.items() if k != "PATH"}
    assert run("health", **env).returncode == 0
    assert run("health", "--ready", **env).returncode == 0
    down = run("health", **{**env, "SYNC_HTTP_ADDR": "127.0.0.1:1"})
    assert down.returncode == 1 and "Connection refused" in down.stderr
