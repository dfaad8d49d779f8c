"""Unit tests: turning changed paths into one rsync list (what is on disk decides)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from sidecar.batch import ADDED, DELETED, MODIFIED, Pending
from sidecar.filters import Excludes
from sidecar.paths import SafeTree
from sidecar.plan import Planner, SharedPlans, make_plan, open_for_writing, unchanged


def plan(
    changes: dict[str, int],
    root: Path,
    busy: set[str] = frozenset(),  # type: ignore[assignment]
    limit: int = 1_000_000,
    excludes: tuple[str, ...] = (),
):
    def probe(tree: SafeTree, rel: str) -> bool:
        os.close(tree.open_file(rel))  # as the real probe: opens the file (no symlink on the way)
        return os.path.basename(rel) in busy

    return make_plan(changes, str(root), probe_busy=probe, limit=limit, excludes=Excludes(excludes))


def test_files_are_sent_missing_paths_deleted(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    p = plan({"a.jpg": MODIFIED, "gone.jpg": DELETED}, tmp_path)
    assert p.send == ["a.jpg"] and p.delete == ["gone.jpg"]
    assert p.files_from() == b"./a.jpg\0"  # the sends; removals go their own way (see sidecar.filters)
    assert p.removals == ["gone.jpg"]


def test_new_directory_is_listed_whole_without_rsync_recursion(tmp_path: Path) -> None:
    (tmp_path / "2026/11").mkdir(parents=True)
    (tmp_path / "2026/11/a.jpg").write_bytes(b"a")
    (tmp_path / "2026/11/a-150x150.jpg").write_bytes(b"b")
    p = plan({"2026": ADDED, "2026/11/a.jpg": ADDED}, tmp_path)
    assert sorted(p.send) == ["2026", "2026/11", "2026/11/a-150x150.jpg", "2026/11/a.jpg"]


def test_directory_metadata_change_is_not_a_walk(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    for i in range(5):
        (tmp_path / f"big/{i}").write_text("x")
    assert plan({"big": MODIFIED}, tmp_path).send == []


def test_moved_in_directory_labelled_deleted_is_still_sent(tmp_path: Path) -> None:
    # watchfiles labels renames by alternation; an unpaired "moved to" can come out as DELETED.
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved/f").write_text("x")
    assert sorted(plan({"moved": DELETED}, tmp_path).send) == ["moved", "moved/f"]


def test_rename_is_delete_plus_add(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new/f").write_text("x")
    p = plan({"old": DELETED, "old/f": DELETED, "new": ADDED}, tmp_path)
    assert p.delete == ["old"]  # topmost missing path only: --force removes what is below
    assert sorted(p.send) == ["new", "new/f"]


def test_missing_parent_is_deleted_instead(tmp_path: Path) -> None:
    p = plan({"x/y/z.jpg": DELETED}, tmp_path)
    assert p.delete == ["x"]


def test_busy_files_are_held_back(tmp_path: Path) -> None:
    (tmp_path / "done.jpg").write_text("x")
    (tmp_path / "writing.jpg").write_text("x")
    p = plan({"done.jpg": ADDED, "writing.jpg": ADDED}, tmp_path, busy={"writing.jpg"})
    assert p.send == ["done.jpg"] and p.busy == ["writing.jpg"]


def test_special_files_and_unsafe_links_are_skipped_and_retracted(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    (tmp_path / "d").mkdir()
    os.symlink("/etc/passwd", tmp_path / "abs")
    os.symlink("../..", tmp_path / "d/up")
    os.symlink("../seed", tmp_path / "d/ok")
    (tmp_path / "seed").write_text("x")
    p = plan({n: ADDED for n in ("fifo", "sock", "abs", "d/up", "d/ok", "seed")}, tmp_path)
    sock.close()
    assert sorted(p.send) == ["d/ok", "seed"]
    assert sorted(path for path, _ in p.skipped) == ["abs", "d/up", "fifo", "sock"]
    # The targets' copies of these names go: nothing there may stand for something the source no longer serves.
    assert p.retract == ["abs", "d/up", "fifo", "sock"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    (tmp_path / "secret").chmod(0)
    assert plan({"secret": ADDED}, tmp_path).skipped == [("secret", "unreadable")]


def test_odd_names(tmp_path: Path) -> None:
    names = ["with space", "new\nline", "-leading", "ünïcödé", "x" * 240]
    for n in names:
        (tmp_path / n).write_text(n)
    p = plan(dict.fromkeys(names, ADDED), tmp_path)
    assert sorted(p.send) == sorted(names)
    assert p.files_from().count(b"\0") == len(names)
    assert all(entry.startswith(b"./") for entry in p.files_from().split(b"\0")[:-1])


def test_limit_asks_for_full_sync(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(50):
        (tmp_path / f"d/{i}").write_text("x")
    assert plan({"d": ADDED}, tmp_path, limit=10).too_many


def test_path_escapes_are_ignored(tmp_path: Path) -> None:
    p = plan({"../etc/passwd": MODIFIED, "/abs": MODIFIED, "": MODIFIED}, tmp_path)
    assert not p and not p.delete


def test_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    with SafeTree(str(tmp_path)) as tree:
        assert open_for_writing(tree, "f") is False
        with open(path, "a"):
            assert open_for_writing(tree, "f") is True
        with open(path):
            assert open_for_writing(tree, "f") is False
        with pytest.raises(FileNotFoundError):
            open_for_writing(tree, "missing")


# ----- trust: nothing outside the tree (issue 8.1), excludes (8.5), a directory replaced by a file (8.6) -----


def test_a_parent_swapped_for_an_outside_symlink_is_never_followed(tmp_path: Path) -> None:
    # Regression: lstat, the lease probe and the walk followed a symlinked *parent*: a directory swapped for a
    # link to the sidecar's key directory after its file was seen made the batch ship the key.
    root, outside = tmp_path / "src", tmp_path / "etc-upsync-ssh"
    root.mkdir()
    outside.mkdir()
    (outside / "id_ed25519").write_text("PRIVATE KEY")
    (root / "d").mkdir()
    (root / "d/id_ed25519").write_text("decoy")
    (root / "d").rename(root / "old")
    (root / "d").symlink_to(outside)
    p = plan({"d/id_ed25519": ADDED, "d": ADDED}, root)
    assert "d/id_ed25519" not in p.send
    assert p.retract == ["d"]  # the link points out of the tree: the target's old "d" goes, nothing arrives
    p = plan({"d/id_ed25519": MODIFIED}, root)  # the event for the directory itself came in another batch
    assert p.send == [] and p.retract == ["d"] and p.delete == []


def test_a_new_directory_walk_never_descends_a_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "src", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "new").mkdir()
    (root / "new/a.jpg").write_text("a")
    (root / "new/in").symlink_to("../new")  # inside: sent as a link, not walked
    (root / "new/out").symlink_to(outside)
    p = plan({"new": ADDED}, root)
    assert sorted(p.send) == ["new", "new/a.jpg", "new/in"]
    assert p.retract == ["new/out"]
    assert not any("secret" in s for s in p.send)


def test_in_tree_symlinked_parent_is_not_followed_either(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real/f.jpg").write_text("f")
    (tmp_path / "alias").symlink_to("real")
    p = plan({"alias/f.jpg": MODIFIED}, tmp_path)
    assert p.send == ["alias"]  # the link itself (safe) is what changed; its target is sent under its own name


def test_a_directory_replaced_by_a_file_sends_the_file_and_deletes_nothing_below(tmp_path: Path) -> None:
    # Regression: "d/f" (ENOTDIR) was planned as a delete of d/f while d was a file: rsync failed with
    # "Not a directory" (23), a partial retry, planned identically forever.
    (tmp_path / "d").write_text("now a file")
    p = plan({"d/f": MODIFIED, "d/g/h": DELETED}, tmp_path)
    assert p.send == ["d"] and p.delete == [] and p.retract == []


def test_excluded_directories_cover_everything_below_them(tmp_path: Path) -> None:
    # Regression: with --files-from each listed path was matched on its own, so /cache/ missed cache/x.
    for d in ("cache/sub", "woocommerce_uploads", "2026"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "cache/sub/x.jpg").write_text("x")
    (tmp_path / "woocommerce_uploads/order.pdf").write_text("x")
    (tmp_path / "2026/a.jpg").write_text("x")
    ex = ("/cache/", "/woocommerce_uploads/")
    changes = {
        "cache/sub/x.jpg": ADDED,
        "woocommerce_uploads": ADDED,
        "2026/a.jpg": ADDED,
        "cache/gone.jpg": DELETED,
        "woocommerce_uploads/old.pdf": DELETED,
    }
    p = plan(changes, tmp_path, excludes=ex)
    assert p.send == ["2026/a.jpg"] and p.delete == []


def test_shared_plans_are_made_once_per_set_of_batches(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    shared = SharedPlans(Planner(str(tmp_path), Excludes(()), None))
    first = shared.get((7,), {"a": ADDED})
    first.send.append("mine")  # each target gets its own lists
    second = shared.get((7,), {"a": ADDED})
    assert second.send == ["a"] and shared.made == 1
    # Targets that fell behind together hold the same merged batches: one plan for them too.
    merged = [shared.get((7, 8), {"a": ADDED, "b": ADDED}) for _ in range(3)]
    assert all(m.send == ["a", "b"] for m in merged) and shared.made == 2
    shared.get(None, {"a": ADDED})  # a target with changes of its own (a retry) plans its own
    assert shared.made == 3


def test_targets_holding_the_same_batches_share_them_and_a_retry_does_not() -> None:
    behind, ahead, retried = Pending(limit=10), Pending(limit=10), Pending(limit=10)
    for p in (behind, ahead, retried):
        p.merge({"a": ADDED}, 1.0, batch=1)
    assert ahead.take().batches == (1,)
    for p in (behind, ahead, retried):
        p.merge({"b": ADDED}, 2.0, batch=2)
    assert behind.take().batches == (1, 2) and ahead.take().batches == (2,)
    snap = retried.take()
    retried.restore(snap)  # a failed attempt: the retry holds changes of its own
    assert retried.take().batches is None


def test_pending_merges_and_bounds() -> None:
    p = Pending(limit=3)
    p.merge({"a": ADDED}, 5.0)
    p.merge({"a": MODIFIED, "b": DELETED}, 2.0)
    snap = p.take()
    assert snap.changes == {"a": ADDED | MODIFIED, "b": DELETED} and snap.seen_at == 2.0
    assert not p
    p.restore(snap)
    p.merge({"c": ADDED}, 9.0)
    assert len(p) == 3
    p.merge({"d": ADDED}, 9.0)  # past the bound: one full sync instead of per-path state
    assert p.full_needed and len(p) == 0 and p.overflows == 1
    p.merge({"e": ADDED}, 10.0)
    snap = p.take()
    assert snap.full and snap.changes == {} and "SYNC_MAX_PENDING" in snap.full_reason


@pytest.mark.parametrize(
    ("steps", "dropped_at"),
    [
        # (what happens, in order), then Snapshot.dropped_at of the full sync taken at the end
        ([("full",), ("merge", 4.0)], 4.0),  # dropped while the full sync was pending
        ([("merge", 3.0), ("merge", 1.0), ("full",)], 3.0),  # held changes dropped by the request: the newest
        ([("full",), ("merge", None)], float("inf")),  # a change of unknown time: no scan is new enough
        ([("full",)], float("-inf")),  # nothing dropped: any recent scan will do
        ([("merge", 2.0), ("take",), ("full",)], float("-inf")),  # taken (and sent) before: not dropped
        ([("full",), ("merge", 6.0), ("fail",)], 6.0),  # a failed full sync keeps what it stood for
        ([("merge", 1.0), ("merge", 7.0), ("fail",), ("full",)], 7.0),  # a failed batch's newest change
        ([("full", 9.0)], 9.0),  # the watcher lost events before 9.0 (review finding: no time was kept)
        ([("merge", 3.0), ("full", 2.0)], 3.0),
    ],
)
def test_a_full_sync_knows_the_newest_change_it_stands_for(steps: list[tuple], dropped_at: float) -> None:
    # Review finding: changes dropped for a pending full sync were covered by a scan made before them.
    p = Pending(limit=100)
    n = 0
    for step in steps:
        if step[0] == "merge":
            n += 1
            p.merge({f"p{n}": MODIFIED}, step[1])
        elif step[0] == "full":
            p.request_full("test", *step[1:])
        elif step[0] == "take":
            p.take()
        else:  # the attempt failed: what it took goes back
            p.restore(p.take())
    snap = p.take()
    assert snap.full and snap.dropped_at == dropped_at


def test_a_scan_older_than_a_dropped_change_is_not_reused(tmp_path: Path) -> None:
    # Review finding: target A's scan saw "x" as a link out of the tree (retracted: hidden from the sender);
    # "x" became an upload again; target B, whose full sync was pending, dropped that event and reused A's
    # scan, and its receiver deleted the new file.
    from sidecar.scan import SharedScan

    (tmp_path / "x").symlink_to("/etc/passwd")
    scans = SharedScan(str(tmp_path), Excludes(()), reuse_s=60)
    first = scans.get()
    assert [p for p, _ in first.retract] == ["x"]
    assert scans.get() is first and scans.get(newer_than=time.monotonic() - 30) is first  # fresh enough
    (tmp_path / "x").unlink()
    (tmp_path / "x").write_text("an upload again")
    seen = time.monotonic()  # when the watcher saw it
    fresh = scans.get(newer_than=seen)
    assert fresh is not first and fresh.retract == [] and scans.made == 2
    assert scans.get(newer_than=seen) is fresh  # started after the change: shared from now on
    assert scans.get(newer_than=float("inf")) is not fresh


def test_a_plan_whose_files_vanished_before_rsync_read_them_did_not_arrive_whole(tmp_path: Path) -> None:
    # Review finding: "a/" renamed away between planning and rsync's listing, then back: rsync skipped the
    # listed files without a word (--ignore-missing-args, exit 0), the batch counted as delivered whole, and
    # the next plan left a/f0 and a/f1 out as "already on the target" (a rename keeps their stamps).
    from sidecar.plan import sent_whole
    from sidecar.rsync import Rsync, classify, parse_stats

    source, target = tmp_path / "src", tmp_path / "dst"
    (source / "a").mkdir(parents=True)
    target.mkdir()
    for i in range(3):
        (source / f"a/f{i}").write_text(str(i))
    planned = plan({"a": ADDED}, source)
    assert sorted(planned.stamps) == ["a/f0", "a/f1", "a/f2"]
    rsync = Rsync(str(source), f"{target}/", "ssh", "", Excludes(()), 30)
    (source / "a").rename(tmp_path / "away")
    result = rsync.run(rsync.send_args(), planned.files_from(), sandboxed=False)
    assert classify(result.returncode, result.stderr).kind == "ok"  # nothing said
    assert not sent_whole(planned, parse_stats(result.stdout).files)
    (tmp_path / "away").rename(source / "a")
    result = rsync.run(rsync.send_args(), planned.files_from(), sandboxed=False)
    assert sent_whole(planned, parse_stats(result.stdout).files)
    assert sorted(p.name for p in (target / "a").iterdir()) == ["f0", "f1", "f2"]


def test_names_past_path_max_are_reported_not_listed(tmp_path: Path) -> None:
    # rsync drops some of them silently (with ./-prefixed entries); the planner reports them instead.
    from tests.test_bad_input import DEEP_TOP, _nest

    _nest(tmp_path, 100, 50)
    p = plan({DEEP_TOP: ADDED}, tmp_path)
    assert p.send and all(len(os.fsencode(f"{tmp_path}/{s}")) < 4096 for s in p.send)
    ((first, why),) = p.skipped  # the topmost one only: everything below it is longer still
    assert why == "File name too long" and len(os.fsencode(f"{tmp_path}/{first}")) >= 4094


# ----- stamps: a file the target already holds as it is is not sent twice (issue 12's 10,000-file bursts) -----


def _newer(tmp: Path, than: Path) -> Path:
    """A file outside the tree whose ctime is past ``than``'s: the file system's clock has moved on."""
    marker = tmp / "clock"
    wait_for_ctime = time.monotonic() + 5
    while True:
        marker.write_bytes(b"x")
        if marker.stat().st_ctime_ns > than.stat().st_ctime_ns:
            return marker
        assert time.monotonic() < wait_for_ctime, "the file system's clock did not move in 5 s"


def _planner(root: Path) -> Planner:
    return Planner(str(root), Excludes(()), probe=None)


def test_a_file_seen_after_the_clock_moved_on_is_settled(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    planner = _planner(root)
    first = planner.plan({"a.jpg": ADDED})
    assert first.send == ["a.jpg"] and set(first.stamps) == {"a.jpg"}
    assert first.settled == set()  # nothing newer seen before its lstat: a change in the same tick could hide
    _newer(root, root / "a.jpg").rename(root / "later")  # in the tree, so the planner sees its ctime
    later = planner.plan({"later": ADDED})
    assert later.settled == set()  # the newest file of all
    again = planner.plan({"a.jpg": MODIFIED})
    assert again.settled == {"a.jpg"} and again.stamps["a.jpg"] == first.stamps["a.jpg"]
    assert unchanged(planner.plan({"a.jpg": MODIFIED}), again) == {"a.jpg"}


def test_a_same_size_rewrite_with_the_old_mtime_is_a_change(tmp_path: Path) -> None:
    # What rsync's quick check (size, whole-second mtime) would miss: the ctime shows it.
    root = tmp_path / "src"
    root.mkdir()
    f = root / "a.jpg"
    f.write_bytes(b"one")
    _newer(root, f).rename(root / "later")
    planner = _planner(root)
    planner.plan({"later": ADDED})
    sent = planner.plan({"a.jpg": ADDED})
    assert sent.settled == {"a.jpg"}
    before = f.stat()
    f.write_bytes(b"two")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert f.stat().st_size == before.st_size and f.stat().st_mtime_ns == before.st_mtime_ns
    assert unchanged(planner.plan({"a.jpg": MODIFIED}), sent) == set()


def test_a_chmod_or_a_replacement_is_a_change(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name in ("mode.jpg", "swap.jpg"):
        (root / name).write_bytes(b"x")
    _newer(root, root / "swap.jpg").rename(root / "later")
    planner = _planner(root)
    planner.plan({"later": ADDED})
    sent = planner.plan({"mode.jpg": ADDED, "swap.jpg": ADDED})
    assert sent.settled == {"mode.jpg", "swap.jpg"}
    (root / "mode.jpg").chmod(0o600)
    (root / "other").write_bytes(b"x")
    (root / "other").rename(root / "swap.jpg")  # same size and content, another file
    assert unchanged(planner.plan({"mode.jpg": MODIFIED, "swap.jpg": ADDED}), sent) == set()


def test_a_burst_walked_in_one_batch_is_unchanged_in_the_next(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "burst").mkdir(parents=True)
    for i in range(20):
        (root / f"burst/{i}.jpg").write_bytes(b"x" * i)
    _newer(root, root / "burst/19.jpg").rename(root / "burst/marker")  # written last: newest
    planner = _planner(root)
    walked = planner.plan({"burst": ADDED})  # the directory's walk sends every file in it
    names = {f"burst/{i}.jpg" for i in range(20)}
    # the directory's ctime (the marker's arrival) is read before any of its files: all but the marker settle
    assert walked.settled == names and len(walked.stamps) == 21
    events = planner.plan(dict.fromkeys(names, ADDED))  # their own events, one batch later
    assert unchanged(events, walked) == names


def test_files_planned_in_the_order_they_were_written_settle(tmp_path: Path) -> None:
    # The burst's second batch: each file's own lstat sees only older ctimes; its directory's does not.
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    names = [f"d/{i:02d}.jpg" for i in range(10)]
    for name in names:
        (root / name).write_bytes(b"x")
    _newer(root, root / names[-1]).rename(root / "d/zz-last")
    p = _planner(root).plan(dict.fromkeys(names, MODIFIED))
    assert p.settled == set(names)


def test_every_target_shares_one_plans_stamps(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    shared = SharedPlans(_planner(tmp_path))
    one, two = shared.get((1,), {"a": ADDED}), shared.get((1,), {"a": ADDED})
    assert one.send is not two.send  # each target's own list
    assert one.stamps is two.stamps and one.settled is two.settled  # one copy, not one per target
