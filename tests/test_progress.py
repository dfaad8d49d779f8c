"""Progress of long full syncs: the tracker's arithmetic (unit) and, against a real sshd, the progress lines,
the gauges and /readyz while a bandwidth-limited first sync runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sidecar.progress import FullSyncOutput, FullSyncProgress, parse_progress2
from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percent_and_eta_from_the_dry_run_totals(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = FullSyncProgress("t", (100, 1_000_000), interval_s=10, clock=clock)
    out = FullSyncOutput(p)
    clock.now += 5
    assert out.feed(b"        250,000  12%    1.00MB/s    0:00:09 (xfr#25, ir-chk=10/300)")
    doc = p.snapshot()
    # rsync says 12 % (of every byte in the tree); of what this run sends, it is 25 %.
    assert (doc["percent"], doc["files_sent"], doc["files_to_send"], doc["eta_s"]) == (25.0, 25, 100, 15)
    assert (doc["checked"], doc["known"], doc["list_complete"]) == (290, 300, False)
    assert p.lines == 0  # not 10 s yet
    clock.now += 5
    with caplog.at_level("INFO", logger="upsync"):
        out.feed(b"        500,000  40%    1.00MB/s    0:00:05  ")  # mid-file: no xfr#
    assert p.lines == 1 and p.snapshot()["percent"] == 50.0 and p.snapshot()["files_sent"] == 25
    fields = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert fields == {
        "target": "t",
        "done": "50.0%",
        "files": "25/100",
        "size": "500.0 kB/1.0 MB",
        "rate": "50.0 kB/s",
        "eta": "0:00:10",
        "elapsed": "0:00:10",
    }


def test_unknown_totals_and_more_than_counted() -> None:
    clock = Clock()
    p = FullSyncProgress("t", None, interval_s=0, clock=clock)
    clock.now += 2
    p.update(parse_progress2(b"  4,000 100%  2kB/s  0:00:01 (xfr#4, to-chk=0/10)"))  # type: ignore[arg-type]
    doc = p.snapshot()
    assert doc["percent"] is None and doc["eta_s"] is None and doc["files_sent"] == 4
    p = FullSyncProgress("t", (1, 10), interval_s=0, clock=clock)
    clock.now += 1
    p.update(parse_progress2(b"  40 100%  2kB/s  0:00:01 (xfr#2, to-chk=0/3)"))  # type: ignore[arg-type]
    doc = p.snapshot()  # a file written since the dry run: never past 100 %
    assert (doc["percent"], doc["files_to_send"], doc["eta_s"]) == (100.0, 2, 0)


def test_itemized_lines_are_consumed_and_reported() -> None:
    seen: list[tuple[str, str]] = []
    out = FullSyncOutput(FullSyncProgress("t", None, 0), lambda what, path: seen.append((what, path)))
    kept = [
        line
        for line in (
            rb"<f+++++++++ a\#012b.jpg",
            b"cd+++++++++ dir/",
            b"*deleting   old.jpg",
            b".d..t...... ./",
            b"Number of files: 3 (reg: 2, dir: 1)",
        )
        if not out.feed(line)
    ]
    assert seen == [("sent", "a\nb.jpg"), ("deleted", "old.jpg")]
    assert kept == [b"Number of files: 3 (reg: 2, dir: 1)"]


def _progress_lines(logs: str) -> list[dict]:
    return [d for d in map(json.loads, filter(None, logs.splitlines())) if d.get("msg") == "full sync progress"]


@pytest.mark.integration
def test_first_full_sync_reports_progress_while_it_runs(source: Path, sshd: SshServer, run_sidecar) -> None:
    for d in range(4):
        (source / f"2026/{d:02d}").mkdir(parents=True)
        for i in range(10):
            (source / f"2026/{d:02d}/img-{i}.jpg").write_bytes(os.urandom(150_000))  # 6 MB in all
    sidecar = run_sidecar(ready=False, SYNC_BWLIMIT="1M", SYNC_PROGRESS_INTERVAL_S="1", SYNC_LOG_FORMAT="json")

    def running_doc() -> dict | None:
        sidecar.check_alive()
        code, doc = sidecar.readyz()
        targets = doc.get("targets") or []
        if code == 503 and targets and (targets[0].get("progress") or {}).get("percent"):
            return targets[0]
        return None

    target = wait_until(running_doc, 20, "/readyz to show the progress")
    assert target["state"] == "starting"  # type: ignore[index]
    progress = target["progress"]  # type: ignore[index]
    assert progress["files_to_send"] == 41 and progress["bytes_to_send"] == 6_000_005
    assert 0 < progress["percent"] < 100 and progress["eta_s"] is not None
    assert sidecar.metric("upsync_full_sync_running") == 1
    status = sidecar.run("status", timeout=20)
    assert re.search(r", full sync [\d.]+% \(\d+ files sent, eta \d+ s\)", status.stdout), status.stdout + status.stderr
    assert sidecar.metric("upsync_full_sync_bytes_to_send") == 6_000_005
    sidecar.wait_ready(30)
    assert_converges(source, sshd.root, 5)
    assert sidecar.metric("upsync_full_sync_running") == 0
    assert "progress" not in sidecar.readyz()[1]["targets"][0]

    lines = _progress_lines(sidecar.logs())
    assert len(lines) >= 2, sidecar.logs()
    done = [float(d["done"].rstrip("%")) for d in lines]
    assert done == sorted(done) and 0 < done[0] < 100
    for d in lines:
        assert re.fullmatch(r"\d+/41", d["files"]) and re.fullmatch(r"\d+:\d\d:\d\d", d["eta"]), d
        assert d["size"].endswith("/6.0 MB") and d["rate"].endswith("/s")
