"""The operator's view of a running daemon: `status` and its exit codes, a stuck target in /healthz (the image's
HEALTHCHECK), SIGHUP and a passing `check` retrying it, one plan per batch for every target."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.helpers import Sidecar, assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


def status(sidecar: Sidecar, *args: str) -> tuple[int, str]:
    proc = sidecar.run("status", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def test_status_lines_and_exit_codes_follow_the_target(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    name = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    (source / "a.jpg").write_text("a")
    wait_until(lambda: (sshd.root / "a.jpg").exists(), 10, "a batch")
    code, out = status(sidecar)
    assert code == 0, out
    (line,) = out.splitlines()
    assert line.startswith(f"{name}: ok, last success ") and ", pending 0, p95 " in line and "delete guard off" in line
    doc = json.loads(status(sidecar, "--json")[1])
    assert doc["ready"] and doc["alive"] and doc["targets"][0]["latency_p95_s"] > 0
    # A failing target (its server stopped): degraded, 1, while it is younger than SYNC_UNHEALTHY_AFTER_S.
    sshd.stop()
    (source / "b.jpg").write_text("b")
    wait_until(lambda: status(sidecar)[0] == 1, 15, "status 1 (degraded)")
    assert ": failing, " in status(sidecar)[1]
    sshd.start()
    wait_until(lambda: status(sidecar)[0] == 0, 30, "status 0 again")


def test_a_target_that_needs_the_operator_fails_the_healthcheck_until_retried(
    source: Path, sshd: SshServer, run_sidecar
) -> None:
    # Issue 9: a fatal target kept `docker ps` green. Now /healthz (the image's HEALTHCHECK) fails, status
    # says 2, and SIGHUP or a passing `check` retry it once the operator fixed the target.
    saved = sshd.root.with_name("target-aside")
    sidecar = run_sidecar()
    sshd.root.rename(saved)  # rrsync's directory gone: retrying cannot help
    (source / "x.jpg").write_text("x")
    wait_until(lambda: sidecar.readyz()[1]["targets"][0]["state"] == "fatal", 20, "the fatal state")
    code, body = sidecar.get("/healthz")
    assert code == 503 and "needs the operator" in body
    assert sidecar.run("health").returncode == 1
    assert status(sidecar)[0] == 2
    saved.rename(sshd.root)  # the operator fixes it ...
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGHUP)  # ... and says so
    sidecar.wait_ready(20)
    assert sidecar.get("/healthz")[0] == 200
    assert_converges(source, sshd.root, 15)
    # The same through `check`: when every target passes, it tells the daemon to try again.
    sshd.root.rename(saved)
    (source / "y.jpg").write_text("y")
    wait_until(lambda: sidecar.readyz()[1]["targets"][0]["state"] == "fatal", 20, "fatal again")
    saved.rename(sshd.root)
    check = sidecar.run("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok   daemon: asked to try again: " in check.stdout
    sidecar.wait_ready(20)
    assert_converges(source, sshd.root, 15)


def test_one_plan_per_batch_serves_every_target_and_a_failed_one_retries_alone(
    source: Path, client_key, workdir: Path, host_key, run_sidecar
) -> None:
    # Issue 12: two targets, one plan per watcher batch; a target that failed plans its own retry.
    a = SshServer(workdir / "sshd-a", client_key, host_key).start()
    b = SshServer(workdir / "sshd-b", client_key, host_key).start()
    try:
        sidecar = run_sidecar(a, b, SYNC_QUIET_MS="50")
        before = sidecar.metric("upsync_plans_total", kind="shared")
        for i in range(5):
            (source / f"f{i}.jpg").write_text(str(i))
            wait_until(lambda i=i: (a.root / f"f{i}.jpg").exists() and (b.root / f"f{i}.jpg").exists(), 10, "both")
        shared = sidecar.metric("upsync_plans_total", kind="shared") - before
        assert 5 <= shared <= sidecar.metric("upsync_events_total"), shared  # one per batch, not one per target
        assert sidecar.metric("upsync_plans_total", kind="private") == 0
        b.stop()
        (source / "while-b-is-down.jpg").write_text("x")
        wait_until(lambda: (a.root / "while-b-is-down.jpg").exists(), 10, "a keeps going")
        wait_until(lambda: sidecar.metric("upsync_failures_total", reason="network") >= 1, 10, "b failing")
        b.start()
        assert_converges(source, b.root, 30)
        assert sidecar.metric("upsync_plans_total", kind="private") >= 1  # b's retry, planned on its own
        assert_converges(source, a.root, 5)
    finally:
        a.stop()
        b.stop()
