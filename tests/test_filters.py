"""rsync's pattern semantics: our matcher against real rsync, and the scoped-delete rules against real rsync."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sidecar.filters import Excludes, delete_rules, pattern_error, rule

# Directories end with "/". Names chosen to hit every rule: anchoring, dir-only, *, **, ?, classes,
# escapes, unanchored patterns with a slash, the /*** form.
TREE = [
    "cache/",
    "cache/x.jpg",
    "cache/deep/",
    "cache/deep/y.jpg",
    "a/",
    "a/cache/",
    "a/cache/z.jpg",
    "a/b.tmp",
    "a/b.tmpx",
    "a/x.tmp/",
    "a/x.tmp/inner.jpg",
    "woocommerce_uploads/",
    "woocommerce_uploads/order-1.pdf",
    "wc-logs/",
    "wc-logs/fatal-2026.log",
    "2026/",
    "2026/12/",
    "2026/12/photo.jpg",
    "2026/12/photo-150x150.jpg",
    "2026/12/[x].jpg",
    "2026/12/star*.jpg",
    "2026/12/back\\slash.jpg",
    "backwpup-abc-backups/",
    "backwpup-abc-backups/x.zip",
    "sub/",
    "sub/wc-logs/",
    "sub/wc-logs/l.log",
    "A9/",
    "A9/f",
]
PATTERNS = [
    "/cache/",
    "cache",
    "cache/",
    "/cache/***",
    "*.tmp",
    "*.tmp/",
    "a/cache",
    "/a/cache/",
    "**/deep",
    "2026/*/photo-*",
    "photo-???x???.jpg",
    "[[]x].jpg",
    "*[0-9]/",
    "[[:upper:]][[:digit:]]",
    "[!a-z]*",
    "star\\*.jpg",
    "back\\slash.jpg",
    "/backwpup-*/",
    "wc-logs/",
    "/wc-logs/",
    "x.jpg",
    "/2026/12/",
]


def _make(root: Path) -> None:
    for entry in TREE:
        path = root / entry.rstrip("/")
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(b"x")


def _rsync_kept(src: Path, dst: Path, pattern: str) -> set[str]:
    out = subprocess.run(
        ["rsync", "-r", "-n", "--out-format=%n", f"--exclude={pattern}", f"{src}/", f"{dst}/"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return {line.rstrip("/") for line in out.splitlines() if line and line != "./"}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_excludes_agree_with_rsync(tmp_path: Path, pattern: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _make(src)
    kept_by_rsync = _rsync_kept(src, dst, pattern)
    ex = Excludes([pattern])
    kept_by_us = {e.rstrip("/") for e in TREE if not ex.excluded(e.rstrip("/"), e.endswith("/"))}
    assert kept_by_us == kept_by_rsync


def test_files_from_paths_below_an_excluded_directory_stay_excluded(tmp_path: Path) -> None:
    # Regression: with --files-from rsync matches each listed path on its own name, so /cache/ did not
    # cover cache/x.jpg; the /** twins make rsync itself agree with the planner.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _make(src)
    listed = b"cache/x.jpg\0cache/deep/y.jpg\0a/x.tmp/inner.jpg\x002026/12/photo.jpg\0"
    ex = Excludes(["/cache/", "*.tmp/"])
    out = subprocess.run(
        ["rsync", "-n", "--out-format=%n", "--from0", "--files-from=-", *ex.rsync_args(), f"{src}/", f"{dst}/"],
        input=listed,
        capture_output=True,
        check=True,
    ).stdout.decode()
    sent = {line.rstrip("/") for line in out.splitlines()}
    assert "2026/12/photo.jpg" in sent
    assert not {"cache/x.jpg", "cache/deep/y.jpg", "a/x.tmp/inner.jpg"} & sent


HOSTILE = [
    "plain.jpg",
    "with space.jpg",
    "trailing space ",
    " leading space",
    "new\nline",
    "tab\there",
    "[x].jpg",
    "star*.jpg",
    "q?.jpg",
    "back\\slash",
    "back\\slash[1]",
    "#hash",
    ";semi",
    "+ plus",
    "- minus",
    "!",
    "-dash",
    "unicode-é-日本",
]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_scoped_delete_removes_exactly_the_named_path(tmp_path: Path, name: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / "d").mkdir(parents=True)
        (root / "d/keep.jpg").write_bytes(b"k")
        (root / "other.jpg").write_bytes(b"o")
    (dst / "d" / name).write_bytes(b"gone")  # missing on the source: must go
    (dst / "d" / (name + "x")).write_bytes(b"stays")  # only on the target, not named: must stay
    (dst / "d/dir").mkdir()
    (dst / "d/dir/f").write_bytes(b"gone too")  # a directory with contents: must go whole
    rules = delete_rules([f"d/{name}", "d/dir"])
    proc = subprocess.run(
        ["rsync", "-r", "--delete", "--from0", "--filter=merge -", f"{src}/", f"{dst}/"],
        input=rules,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    left = sorted(os.listdir(dst / "d"))
    assert left == sorted(["keep.jpg", name + "x"])
    assert (dst / "other.jpg").exists()


def test_scoped_delete_removes_a_copy_the_source_replaced_with_an_outside_symlink(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (dst / "d").mkdir(parents=True)
    (dst / "d/photo.jpg").write_bytes(b"old copy")
    (src / "d/photo.jpg").symlink_to("/etc/passwd")
    proc = subprocess.run(
        ["rsync", "-r", "--links", "--safe-links", "--delete", "--from0", "--filter=merge -", f"{src}/", f"{dst}/"],
        input=delete_rules(["d/photo.jpg"]),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert not os.path.lexists(dst / "d/photo.jpg")


def test_user_excludes_protect_from_scoped_deletes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (dst / "cache").mkdir(parents=True)
    (dst / "cache/x").write_bytes(b"x")
    proc = subprocess.run(
        ["rsync", "-r", "--delete", "--from0", "--filter=merge -", f"{src}/", f"{dst}/"],
        input=delete_rules(["cache/x"], user=["/cache/"]),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert (dst / "cache/x").exists()


@pytest.mark.parametrize(
    ("pattern", "error"),
    [("+ keep", "include"), ("- x", "rule prefix"), ("!", "clears"), ("[abc", "unclosed"), ("ok/*.jpg", "")],
)
def test_pattern_errors(pattern: str, error: str) -> None:
    assert (error in pattern_error(pattern)) if error else pattern_error(pattern) == ""


def test_rule_escapes_only_where_rsync_unescapes() -> None:
    assert rule("R", "a\\b") == "R /a\\b"  # no wildcard: the backslash is literal to rsync
    assert rule("R", "a\\b", "/***") == "R /a\\\\b/***"
    assert rule("H", "[x]") == "H /\\[x]"
