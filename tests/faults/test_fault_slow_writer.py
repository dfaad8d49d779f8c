"""Files written slowly over seconds are never visible half-written on the target.

tests/test_daemon.py checks one new file. Here: three writers at once (pauses far longer than the quiet
window), one of them rewriting a file the target already has (the target must keep the old version
until the new one is complete), while the target is sampled every few milliseconds; and the documented
limit, ``SYNC_WRITE_WAIT_S``, past which a file still open is sent anyway (with a warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from tests.faults.faultlib import count_entries, log_lines
from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]

CHUNK = 64 * 1024
CHUNKS = 30  # x 0.1 s: each file takes 3 s to write


def slow_write(path: Path, content: bytes, pause: float = 0.1) -> None:
    with open(path, "wb") as fh:
        for off in range(0, len(content), CHUNK):
            fh.write(content[off : off + CHUNK])
            fh.flush()
            time.sleep(pause)


class TargetSampler(threading.Thread):
    """Records the digest of every version of some target files it sees."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.seen: dict[str, set[str]] = {f.name: set() for f in files}
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for f in self.files:
                with contextlib.suppress(FileNotFoundError):
                    self.seen[f.name].add(hashlib.sha256(f.read_bytes()).hexdigest())
            self.samples += 1
            time.sleep(0.005)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_slow_writers_never_half_visible(source: Path, sshd: SshServer, start_synced, record) -> None:
    old = os.urandom(300_000)
    (source / "rewritten.jpg").write_bytes(old)
    sidecar = start_synced()
    assert (sshd.root / "rewritten.jpg").read_bytes() == old
    contents = {name: os.urandom(CHUNK * CHUNKS) for name in ("new-a.jpg", "new-b.jpg", "rewritten.jpg")}
    sampler = TargetSampler([sshd.root / name for name in contents])
    sampler.start()
    started = time.monotonic()
    writers = [threading.Thread(target=slow_write, args=(source / n, c)) for n, c in contents.items()]
    try:
        for w in writers:
            w.start()
        (source / "meanwhile.txt").write_text("other files still flow")  # the held ones block nothing
        wait_until(lambda: (sshd.root / "meanwhile.txt").exists(), 5, "a quick file while the slow ones are written")
        meanwhile_s = time.monotonic() - started
        for w in writers:
            w.join()
        written = time.monotonic()
        assert_converges(source, sshd.root, 15)
        after_close_s = time.monotonic() - written
    finally:
        sampler.done.set()
        sampler.join()
    allowed = {name: {digest(c)} for name, c in contents.items()}
    allowed["rewritten.jpg"].add(digest(old))
    half = {name: len(sampler.seen[name] - allowed[name]) for name in contents}
    record(
        files_checked=count_entries(source),
        writers=len(contents),
        write_s=round(written - started, 1),
        samples=sampler.samples,
        partial_versions_seen=half,
        other_file_arrived_s=round(meanwhile_s, 1),
        complete_after_close_s=round(after_close_s, 1),
    )
    assert half == dict.fromkeys(contents, 0), f"half-written versions on the target: {half}"
    assert not log_lines(sidecar, "sending it anyway")


def test_write_wait_limit_sends_an_open_file_anyway(source: Path, sshd: SshServer, start_synced, record) -> None:
    """Documented behaviour: past SYNC_WRITE_WAIT_S a file still open is sent as it is, with a warning."""
    sidecar = start_synced(SYNC_WRITE_WAIT_S="1")
    content = os.urandom(CHUNK * CHUNKS)
    sampler = TargetSampler([sshd.root / "stuck.jpg"])
    sampler.start()
    try:
        slow_write(source / "stuck.jpg", content)
        assert_converges(source, sshd.root, 15)
    finally:
        sampler.done.set()
        sampler.join()
    partial = len(sampler.seen["stuck.jpg"] - {digest(content)})
    warnings = log_lines(sidecar, "sending it anyway")
    record(write_wait_s=1, write_s=3, partial_versions_seen=partial, warnings=len(warnings))
    assert warnings and partial >= 1  # the trade-off is real and announced
