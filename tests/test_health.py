"""/healthz, /readyz and /metrics of a running daemon, as an operator or Prometheus sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Sidecar, wait_until
from tests.sshd import KeyPair, SshServer

pytestmark = pytest.mark.integration


def test_readyz_is_503_until_first_full_sync(source: Path, sshd: SshServer, run_sidecar) -> None:
    sshd.stop()  # the first full sync cannot happen
    sidecar = run_sidecar(ready=False)
    wait_until(lambda: sidecar.get("/healthz")[0] == 200, 10, "healthz")
    # The HTTP server answers before the workers exist (/readyz 503 with no targets yet): wait for the worker.
    wait_until(lambda: sidecar.readyz()[1]["targets"], 10, "the target's worker in /readyz")
    code, doc = sidecar.readyz()
    assert code == 503
    (target,) = doc["targets"]
    assert target["ready"] is False and target["state"] in ("starting", "failing")
    wait_until(lambda: sidecar.readyz()[1]["targets"][0]["state"] == "failing", 10, "the failing state")
    assert sidecar.readyz()[1]["targets"][0]["reason"] == "network"
    sshd.start()
    doc = sidecar.wait_ready(20)
    assert doc["targets"][0]["state"] == "ok" and doc["watcher"] == "inotify"


def test_metrics_content(source: Path, sshd: SshServer, run_sidecar) -> None:
    sidecar = run_sidecar()
    name = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    for i in range(3):
        (source / f"m{i}.jpg").write_bytes(b"z" * 1000)
    wait_until(lambda: sidecar.metric("upsync_files_sent_total", target=name) >= 4, 10, "files counted")
    assert sidecar.metric("upsync_bytes_sent_total", target=name) >= 3000
    assert sidecar.metric("upsync_events_total") >= 3
    assert sidecar.metric("upsync_syncs_total", target=name, kind="batch", status="success") >= 1
    assert sidecar.metric("upsync_replication_latency_seconds_count", target=name) >= 1
    assert sidecar.metric("upsync_last_success_timestamp_seconds", target=name) > 1.7e9
    assert sidecar.metric("upsync_pending_paths", target=name) == 0
    assert sidecar.metric("upsync_ready") == 1
    _, text = sidecar.get("/metrics")
    assert "# TYPE upsync_replication_latency_seconds histogram" in text
    assert "process_resident_memory_bytes" in text
    sshd.stop()
    (source / "during-outage.jpg").write_text("x")
    wait_until(
        lambda: sidecar.metric("upsync_failures_total", target=name, reason="network") >= 1,
        10,
        "a failure counted with its reason",
    )
    wait_until(lambda: sidecar.metric("upsync_pending_paths", target=name) >= 1, 10, "pending paths")
    assert sidecar.get("/nope")[0] == 404


def test_a_new_targets_series_start_at_zero(sshd: SshServer, run_sidecar) -> None:
    # Regression (the monitoring stack's p95 query stayed NaN for a web node): Prometheus' rate() sees nothing
    # in a series whose first scrape already holds its first observations, so a target's latency histogram
    # must be there, at 0, before its first batch. (Its sent/deleted counters are made by the first full sync;
    # the unchanged-files counter by no sync at all, so it starts at 0 too.)
    sidecar = run_sidecar()
    name = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    _, text = sidecar.get("/metrics")
    for series in (
        "upsync_replication_latency_seconds_count",
        'upsync_replication_latency_seconds_bucket{le="0.1",',
        "upsync_files_unchanged_total",
    ):
        head, _, labels = series.partition("{")
        wanted = f'{head}{{{labels}target="{name}"}} 0.0'
        assert wanted in text, f"{wanted} not in /metrics"


def test_fatal_target_is_reported_not_retried(source: Path, sshd: SshServer, run_sidecar) -> None:
    sshd.root.rmdir()  # rrsync's jail directory is gone: retrying cannot help
    sidecar = run_sidecar(ready=False)

    def fatal() -> dict | None:
        code, doc = sidecar.readyz()
        targets = doc.get("targets") or []  # none yet right after the start
        return targets[0] if code == 503 and targets and targets[0]["state"] == "fatal" else None

    target = wait_until(fatal, 15, "the fatal state")
    assert target["reason"] == "target_path"
    assert "rrsync directory does not exist" in target["message"]
    assert "needs the operator" in sidecar.logs()


def test_http_addr_in_use_is_a_config_error(
    source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, run_sidecar
) -> None:
    first = run_sidecar()
    second = Sidecar(source, [sshd], client_key, workdir, SYNC_HTTP_ADDR=f"127.0.0.1:{first.port}")
    proc = second.run()
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f'upsync: invalid SYNC_HTTP_ADDR="127.0.0.1:{first.port}": must be an address')
    assert "Traceback" not in proc.stderr


def test_json_logs(source: Path, sshd: SshServer, run_sidecar) -> None:
    import json

    sidecar = run_sidecar(SYNC_LOG_FORMAT="json")
    (source / "j.txt").write_text("j")
    wait_until(lambda: '"kind": "batch"' in sidecar.logs(), 10, "a batch log line")
    lines = [json.loads(line) for line in sidecar.logs().splitlines() if line.startswith("{")]
    batch = next(d for d in lines if d.get("kind") == "batch")
    assert {"time", "level", "msg", "target", "files", "bytes", "ms"} <= set(batch)
    assert not any("PRIVATE KEY" in line for line in sidecar.logs().splitlines())


def test_ready_and_state_metrics_need_no_readyz_poll(source: Path, sshd: SshServer, run_sidecar) -> None:
    # Regression: upsync_ready used to change only when someone polled /readyz, so a Prometheus that
    # scrapes /metrics alone saw 0 forever. Here nothing but /metrics is ever asked.
    sidecar = run_sidecar(ready=False)
    name = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    wait_until(lambda: sidecar.metric("upsync_ready") == 1, 20, "upsync_ready 1 from /metrics alone")
    assert sidecar.metric("upsync_target_state", target=name, state="ok") == 1
    assert sidecar.metric("upsync_target_state", target=name) == 1  # one-hot over the states
    assert sidecar.metric("upsync_full_sync_interval_seconds") == 3600
    _, text = sidecar.get("/metrics")
    assert 'upsync_build_info{revision="' in text and 'version="' in text
    sshd.stop()
    (source / "while-down.txt").write_text("x")
    wait_until(lambda: sidecar.metric("upsync_target_state", target=name, state="failing") == 1, 15, "failing")
    assert sidecar.metric("upsync_ready") == 0
