"""Where the watcher's walks start (sidecar/roots.py): every readable directory is reached by a walk that no
walk breaker (an unreadable directory, a symlink to a directory) can cut, in whatever order notify walks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sidecar import roots
from sidecar.roots import breakers, watch_roots


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Paths os.scandir refuses as it would for another owner's 0700 directory (the tests run as root)."""
    refused: set[str] = set()
    real = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        if os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(roots.os, "scandir", scandir)
    return refused


def rel(root: Path, paths: list[str]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_a_clean_tree_is_one_walk(tmp_path: Path) -> None:
    for d in ("2024/01", "2024/02", "2025/01"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "2024/01/a.jpg").write_text("a")
    (tmp_path / "file-link.jpg").symlink_to(tmp_path / "2024/01/a.jpg")  # a link to a file breaks nothing
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert watch_roots(str(tmp_path)).paths == [str(tmp_path)]
    assert breakers(str(tmp_path)) == []


def test_a_symlinked_directory_makes_its_siblings_and_its_ancestors_siblings_walks(tmp_path: Path) -> None:
    for d in ("x/y", "x/z", "w", "x/y/inner"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "x/y/to-root").symlink_to("/")
    found = watch_roots(str(tmp_path))
    assert rel(tmp_path, found.paths) == [".", "w", "x/y/inner", "x/z"]
    assert (found.unreadable, found.links) == (0, 1)
    assert rel(tmp_path, breakers(str(tmp_path / "x"))) == ["x/y/to-root"]


def test_an_unreadable_directory_is_no_walk_of_its_own(tmp_path: Path, unreadable: set[str]) -> None:
    for d in ("lost+found", "2024/01", "2025", "private/sub"):
        (tmp_path / d).mkdir(parents=True)
    unreadable.update({str(tmp_path / "lost+found"), str(tmp_path / "private")})
    found = watch_roots(str(tmp_path))
    # private's own children cannot be seen; lost+found and private are not walks (they would fail).
    assert rel(tmp_path, found.paths) == [".", "2024", "2025"]
    assert (found.unreadable, found.links) == (2, 0)
    # Polled directory by directory: every directory that can be listed, and nothing below the others.
    assert sorted(rel(tmp_path, found.dirs)) == [".", "2024", "2024/01", "2025"] and found.unpollable == []


def test_a_link_to_a_directory_that_cannot_be_opened_leaves_its_directory_out_of_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # notify's poller opens a followed link's target (walkdir's loop check) and fails on it at every poll.
    for d in ("a", "b/c", "private"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "b/to-a").symlink_to(tmp_path / "a")  # opens: polled as usual
    (tmp_path / "b/c/gone").symlink_to(tmp_path / "nowhere")  # dangling: not a directory, not a breaker
    (tmp_path / "b/c/blocked").symlink_to(tmp_path / "private")  # as if private were another owner's 0700
    real = roots._opens
    monkeypatch.setattr(roots, "_opens", lambda path: not path.endswith("/blocked") and real(path))
    found = watch_roots(str(tmp_path))
    assert rel(tmp_path, found.unpollable) == ["b/c"]
    assert sorted(rel(tmp_path, found.dirs)) == [".", "a", "b", "private"]
    assert (found.unreadable, found.links) == (0, 2)


def test_names_watchfiles_cannot_take_are_no_walks_of_their_own(tmp_path: Path) -> None:
    # Review finding: a directory whose name is not UTF-8 next to a breaker became a watch path, and
    # RustNotify raised UnicodeEncodeError: the watcher died and the daemon stopped, at every start.
    (tmp_path / "ok").mkdir()
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"caf\xe9", b"inner"))
    (tmp_path / "link").symlink_to("/")
    found = watch_roots(str(tmp_path) + "/")  # a trailing slash, too: it used to loop forever
    assert rel(tmp_path, found.paths) == [".", "ok"]
    assert sorted(rel(tmp_path, found.dirs)) == [".", "ok"]
    for path in (*found.paths, *found.dirs):
        path.encode("utf-8")


def test_links_to_nothing_matter_to_the_poller_only(tmp_path: Path) -> None:
    # Review finding: polled, a symlink loop was an error at every poll (109 watcher restarts in 5.5 s, changes
    # dropped) and a dangling link a "deleted" change at every poll (an rsync per poll, forever).
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    (tmp_path / "a/dangling").symlink_to("nowhere")
    (tmp_path / "a/loop").symlink_to("loop")
    found = watch_roots(str(tmp_path))
    assert found.paths == [str(tmp_path)]  # inotify's walk skips both: one walk, as before
    assert (found.bad_links, found.breakers) == (2, 2)
    assert rel(tmp_path, found.unpollable) == ["a"]  # listed by the watcher thread when polled
    assert sorted(rel(tmp_path, found.dirs)) == [".", "b"]


def test_an_unreadable_root_is_left_to_the_watcher(tmp_path: Path, unreadable: set[str]) -> None:
    unreadable.add(str(tmp_path))
    assert watch_roots(str(tmp_path)).paths == [str(tmp_path)]


def _notify_walks(tree: dict[str, list[str]], broken: set[str], paths: list[str], rng: random.Random) -> set[str]:
    """What notify 8.0 watches: each path walked depth first, children in any order, each walk ending at its
    first breaker (an error from one path does not stop the next path's walk)."""
    watched: set[str] = set()
    for start in paths:
        stack = [start]
        while stack:
            node = stack.pop()
            if node in broken:
                break  # add_watch's `?`: the rest of this walk is never made
            watched.add(node)
            kids = list(tree.get(node, []))
            rng.shuffle(kids)
            stack.extend(reversed(kids))
    return watched


@pytest.mark.parametrize("seed", range(100))
def test_every_readable_directory_is_watched_whatever_the_walk_order(
    tmp_path: Path, unreadable: set[str], seed: int
) -> None:
    rng = random.Random(seed)
    root = str(tmp_path / "src")
    os.mkdir(root)
    tree: dict[str, list[str]] = {}  # real directories and symlinks to directories, as notify walks them
    dirs = [root]
    broken: set[str] = set()
    for i in range(rng.randint(5, 40)):
        parent = rng.choice([d for d in dirs if d not in broken])
        path = os.path.join(parent, f"n{i}")
        kind = rng.random()
        if kind < 0.15:
            os.symlink(tmp_path, path)  # a symlink to a directory
            broken.add(path)
        else:
            os.mkdir(path)
            dirs.append(path)
            if kind < 0.3:
                unreadable.add(path)
                broken.add(path)
        tree.setdefault(parent, []).append(path)
    # An unreadable directory's children cannot be listed: for notify they do not exist.
    reachable = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in broken:
            continue
        reachable.add(node)
        stack.extend(tree.get(node, []))
    paths = watch_roots(root).paths
    for order in range(5):
        watched = _notify_walks(tree, broken, paths, random.Random(seed * 100 + order))
        assert reachable <= watched, sorted(reachable - watched)
