"""The watcher thread on a real directory: batching, nothing lost meanwhile, restarts that ask for a full sync."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.batch import ADDED, DELETED
from sidecar.watcher import Watcher, overflow_threshold
from tests.helpers import wait_until


class Recorder:
    def __init__(self) -> None:
        self.batches: queue.Queue[dict[str, int]] = queue.Queue()
        self.lost: list[str] = []
        self.fatal: list[str] = []
        self.block = threading.Event()
        self.block.set()

    def on_batch(self, changes: dict[str, int], seen_at: float) -> None:
        self.block.wait(10)  # a slow target: the next events must wait, not vanish
        self.batches.put(changes)

    def seen(self, timeout: float = 5) -> dict[str, int]:
        """Everything delivered until nothing more arrives for a moment."""
        out: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                batch = self.batches.get(timeout=0.3)
            except queue.Empty:
                if out:
                    return out
                continue
            for k, v in batch.items():
                out[k] = out.get(k, 0) | v
        return out


@contextlib.contextmanager
def watching(root: Path, backend: str = "auto") -> Iterator[tuple[Recorder, Watcher]]:
    """A started watcher on ``root`` (polls every 100 ms), stopped and joined afterwards."""
    rec = Recorder()
    w = Watcher(
        str(root),
        quiet_ms=20,
        max_delay_ms=300,
        backend=backend,
        poll_interval_ms=100,
        on_batch=rec.on_batch,
        on_lost=rec.lost.append,
        on_fatal=rec.fatal.append,
    )
    w.start()
    try:
        assert w.started.wait(5)
        yield rec, w
    finally:
        w.stop()
        rec.block.set()
        w.join(5)
    assert not w.is_alive()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Recorder, Watcher]]:
    with watching(tmp_path) as (rec, w):
        yield tmp_path, rec, w


def test_batch_after_quiet_window(watched) -> None:
    root, rec, _ = watched
    (root / "a.jpg").write_text("a")
    (root / "sub").mkdir()
    seen = rec.seen()
    assert seen["a.jpg"] & ADDED and seen["sub"] & ADDED


def test_changes_while_a_batch_is_handled_are_kept(watched) -> None:
    root, rec, _ = watched
    rec.block.clear()  # the first batch "takes long to send"
    (root / "first").write_text("1")
    time.sleep(0.2)  # the first batch is now being handled
    for i in range(50):
        (root / f"meanwhile-{i}").write_text(str(i))
    rec.block.set()
    names: set[str] = set()
    wait_until(lambda: names.update(rec.seen(1)) or len(names) >= 51, 10, "all 51 paths")
    assert names == {"first"} | {f"meanwhile-{i}" for i in range(50)}


def test_max_delay_bounds_a_continuous_stream(watched) -> None:
    root, rec, _ = watched
    stop = time.monotonic() + 1.5
    start = time.monotonic()
    i = 0
    while time.monotonic() < stop and rec.batches.empty():
        (root / f"s{i}").write_text("x")  # never quiet for 20 ms
        i += 1
        time.sleep(0.005)
    assert not rec.batches.empty(), "no batch although changes kept coming"
    assert time.monotonic() - start < 1.0  # max delay 300 ms (+ one quiet step)


def test_undecodable_name_restarts_watcher_and_asks_for_full_sync(watched) -> None:
    root, rec, w = watched
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as fh:
        fh.write(b"x")
    wait_until(lambda: rec.lost, 10, "a full-sync request")
    assert "watcher error" in rec.lost[0]
    (root / "after.jpg").write_text("still watching")
    wait_until(lambda: "after.jpg" in rec.seen(1), 10, "events after the restart")
    assert w.is_alive()


def test_source_deleted_and_recreated(watched) -> None:
    root, rec, _ = watched
    (root / "x").write_text("x")
    rec.seen()
    for entry in root.iterdir():
        entry.unlink()
    root.rmdir()
    root.mkdir()  # often the same inode number again
    wait_until(lambda: rec.lost, 10, "a full-sync request after the source was replaced")
    (root / "new").write_text("watched again")
    wait_until(lambda: "new" in rec.seen(1), 10, "events in the new directory")


def test_big_burst_asks_for_a_full_sync(watched) -> None:
    root, rec, w = watched
    w._threshold = 50  # as if fs.inotify.max_queued_events were 50
    for i in range(200):
        (root / f"b{i}").write_text("x")
    wait_until(lambda: any("overflowed" in r for r in rec.lost), 10, "an overflow suspicion")


def test_deleted_flag(watched) -> None:
    root, rec, _ = watched
    (root / "d").write_text("x")
    rec.seen()
    (root / "d").unlink()
    assert rec.seen()["d"] & DELETED


def test_overflow_threshold_reads_the_kernel_setting(tmp_path: Path) -> None:
    f = tmp_path / "q"
    f.write_text("16384\n")
    assert overflow_threshold(str(f)) == 16384
    f.write_text("16\n")
    assert overflow_threshold(str(f)) == 64
    assert overflow_threshold(str(tmp_path / "missing")) == 16384


def test_polling_a_tree_that_gains_a_link_to_a_directory_polls_directory_by_directory(tmp_path: Path) -> None:
    # Review finding: the poller walks every root at every poll and follows links: a link made later (to /, to
    # another volume) would have been walked whole at every poll. The watch is made again, directory by
    # directory. (A link into a place the poller fails on restarts the watch anyway; this one it walks fine.)
    source, outside = tmp_path / "src", tmp_path / "elsewhere"
    (source / "2026").mkdir(parents=True)
    (outside / "a/b").mkdir(parents=True)
    with watching(source, "poll") as (rec, w):
        (source / "elsewhere").symlink_to(outside)
        wait_until(lambda: w._flat, 10, "polling directory by directory")
        assert "polled directory by directory" in rec.lost[0]
        (source / "2026/a.jpg").write_text("a")
        wait_until(lambda: "2026/a.jpg" in rec.seen(1), 10, "a change below, polled on its own")
        assert not rec.fatal


def test_listing_changes_reads_like_watchfiles() -> None:
    from watchfiles import Change

    from sidecar.watcher import _listing_changes

    before = {"/s/a": (1, 10, 5, 5), "/s/b": (2, 10, 5, 5), "/s/c": (3, 10, 5, 5)}
    after = {"/s/a": (1, 10, 5, 5), "/s/b": (2, 11, 6, 6), "/s/d": (4, 1, 7, 7)}
    assert _listing_changes(before, after) == {
        (Change.modified.value, "/s/b"),
        (Change.deleted.value, "/s/c"),
        (Change.added.value, "/s/d"),
    }


def test_polling_a_tree_that_gains_a_dangling_link_does_not_churn(tmp_path: Path) -> None:
    # Review finding: the poller reported a dangling link as deleted at every poll: a batch (an rsync to every
    # target) per poll, forever. Its directory is listed by the watcher thread instead.
    (tmp_path / "2026").mkdir()
    with watching(tmp_path, "poll") as (rec, w):
        (tmp_path / "2026/gone").symlink_to("nowhere")
        wait_until(lambda: w._unpollable == [str(tmp_path / "2026")], 10, "2026 listed by the watcher thread")
        rec.seen(0.5)  # what the change itself brought
        assert rec.seen(1.5) == {}, "batches keep coming for a link that does not change"
        (tmp_path / "2026/a.jpg").write_text("a")
        wait_until(lambda: "2026/a.jpg" in rec.seen(1), 10, "a change in the listed directory")
        assert not rec.fatal
