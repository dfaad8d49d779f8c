"""A target down for 60 s in the middle of a 5,000-file burst: memory stays bounded, everything converges.

Two daemons watch the same source, each with its own target, so one outage measures both pending
strategies: the default ``SYNC_MAX_PENDING`` (every changed path kept) and a small one the burst
exceeds (the pending set is dropped for one full sync).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import burst, converge_all, count_entries, log_lines, rss_kb
from tests.helpers import wait_until
from tests.sshd import KeyPair, SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]

OUTAGE_S = 60
FILES = 5000
BEFORE = 1000  # written before the target goes down; the other 4,000 during the outage
SMALL_PENDING = 1000


def test_target_down_60s_mid_burst(
    source: Path, sshd: SshServer, start_synced, workdir: Path, client_key: KeyPair, host_key: KeyPair, record
) -> None:
    other = SshServer(workdir / "sshd-small", client_key, host_key).start()
    try:
        full = start_synced(sshd)  # SYNC_MAX_PENDING default (20000): keeps every path
        capped = start_synced(other, SYNC_MAX_PENDING=str(SMALL_PENDING))
        daemons = {"default": full, "capped": capped}
        rss_start = {n: rss_kb(d.proc.pid) for n, d in daemons.items()}

        burst(source, 0, BEFORE)
        wait_until(lambda: any(sshd.root.glob("b-*/f*")), 15, "the burst to start arriving")
        down_at = time.monotonic()
        sshd.stop()  # a real outage: the server and every session die
        other.stop()

        def rest_of_burst() -> None:
            burst(source, BEFORE, FILES, pause_every=250, pause=0.05)
            for i in range(0, 200, 2):  # edits and deletes of files the target already had
                (source / f"b-{i % 50:02d}/f{i:05d}.bin").write_bytes(b"edited during the outage")
                (source / f"b-{(i + 1) % 50:02d}/f{i + 1:05d}.bin").unlink()

        writer = threading.Thread(target=rest_of_burst)
        writer.start()
        samples: dict[str, list[int]] = {n: [] for n in daemons}
        pending: dict[str, int] = dict.fromkeys(daemons, 0)
        burst_done_at = 0.0
        while time.monotonic() - down_at < OUTAGE_S:
            for name, daemon in daemons.items():
                daemon.check_alive()
                samples[name].append(rss_kb(daemon.proc.pid))
                pending[name] = max(pending[name], int(daemon.metric("upsync_pending_paths")))
            if not burst_done_at and not writer.is_alive():
                burst_done_at = time.monotonic() - down_at
            time.sleep(0.5)
        writer.join()
        n_samples_burst = max(1, int(burst_done_at / 0.5))
        not_ready = {n: d.readyz() for n, d in daemons.items()}
        capped_doc = not_ready["capped"][1]["targets"][0]

        sshd.start()
        other.start()
        took = converge_all({"default": (source, sshd.root), "capped": (source, other.root)}, timeout=60)
        for daemon in daemons.values():
            daemon.wait_ready(20)
        rss_after = {n: rss_kb(d.proc.pid) for n, d in daemons.items()}
        figures = {
            "files_checked": count_entries(source),
            "outage_s": OUTAGE_S,
            "burst_written_s": round(burst_done_at, 1),
            "converge_s_default": took["default"],
            "converge_s_capped": took["capped"],
            "pending_max_default": pending["default"],
            "pending_max_capped": pending["capped"],
            "capped_fallback": sorted(
                {ln.split('why="')[1].rstrip('"') for ln in log_lines(capped, "SYNC_MAX_PENDING") if 'why="' in ln}
            ),
        }
        for name in daemons:
            figures[f"rss_kb_{name}"] = {
                "start": rss_start[name],
                "outage_max": max(samples[name]),
                "outage_end": samples[name][-1],
                "end_of_burst": samples[name][min(n_samples_burst, len(samples[name]) - 1)],
                "after_converge": rss_after[name],
            }
        record(**figures)

        assert all(code == 503 for code, _ in not_ready.values()), "readyz must report the dead target"
        # Default limit: every changed path is kept (about 4,100 here), far below the limit.
        assert 4000 <= pending["default"] <= 20000
        # Small limit: the set was dropped for one full sync, so it never held more than the limit.
        assert pending["capped"] <= SMALL_PENDING and capped_doc["full_sync_pending"] is True
        # Either way to the fallback is fine: the merged set grew past the limit ("more than 1000 changed
        # paths waiting"), or one batch planned more than the limit ("a new directory holds more than ...").
        assert "SYNC_MAX_PENDING" in capped_doc.get("message", "") + capped.logs()
        for name in daemons:
            # Bounded: the outage costs a few MB (the pending set), and idling on a dead target
            # (a failed ssh every 2 s) does not grow it further.
            assert max(samples[name]) - rss_start[name] < 40_000, (name, samples[name])
            tail = samples[name][n_samples_burst:]
            assert max(tail) - min(tail) < 8_000, (name, tail)
    finally:
        other.stop()
