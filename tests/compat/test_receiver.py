"""What each target's rsync receiver accepts through ``rrsync -wo``: the facts a delete method rests on.

These run rsync itself (the host's, as the daemon does), not the daemon: they pin down, per version,
that ``--delete-missing-args`` is refused by the 3.2.7 receiver and where, and that a delete expressed
as filter rules scoped to the parent directories works on every version, names with wildcards, newlines
or filter syntax and directories with contents included.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.compat.targets import UID, TargetContainer
from tests.helpers import tree
from tests.sshd import KeyPair

pytestmark = pytest.mark.integration

_WILD = re.compile(r"[*?\[]")
_SPECIAL = re.compile(r"([*?\[\]\\])")


def pattern(path: str, wild: bool = False) -> str:
    r"""An anchored rsync filter pattern matching exactly ``path``.

    rsync reads backslashes as escapes only in a pattern that holds a wildcard character (``*?[``), so a
    plain name is given as is, and one with wildcards (or ``wild``: a ``/***`` will follow) is escaped.

    Example:
        >>> print(pattern("a/x.jpg"), pattern("a/back\\slash"), pattern("a/[x*].jpg"), pattern("a/b\\c", wild=True))
        /a/x.jpg /a/back\slash /a/\[x\*\].jpg /a/b\\c
    """
    if wild or _WILD.search(path):
        path = _SPECIAL.sub(r"\\\1", path)
    return "/" + path


def delete_rules(paths: Iterable[str]) -> list[str]:
    """Filter rules for ``rsync -r --delete`` that delete exactly ``paths`` (files or whole directories).

    ``R`` ("risk") un-protects a path on the receiver; the parents are included so that rsync visits them;
    everything else is excluded, so it is neither sent nor deleted. ``P/***`` takes a directory's contents
    along: with ``R P`` alone they stay protected and rsync answers "cannot delete non-empty directory".
    """
    rules: list[str] = []
    parents: dict[str, None] = {}
    for path in paths:
        rules += [f"R {pattern(path)}", f"R {pattern(path, wild=True)}/***"]
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parents["/".join(parts[:i])] = None
    rules += [f"+ {pattern(parent)}/" for parent in parents]
    return [*rules, "- *"]


class Rsync:
    """The host's rsync against one target directory, through the container's sshd and rrsync."""

    def __init__(self, target: TargetContainer, key: KeyPair, workdir: Path) -> None:
        known = workdir / "known_hosts"
        known.write_text(target.known_hosts_line() + "\n")
        self.shell = (
            f"ssh -i {key.private} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} "
            "-o StrictHostKeyChecking=yes -o BatchMode=yes"
        )
        self.dest = f"upsync@{target.address}:/"

    def __call__(self, source: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["rsync", "-e", self.shell, *args, f"{source}/", self.dest],
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )


@pytest.fixture
def rsync(target: TargetContainer, client_key: KeyPair, workdir: Path) -> Rsync:
    return Rsync(target, client_key, workdir)


def fill(root: Path, paths: Iterable[str], chown: bool = False) -> None:
    for rel in paths:
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(rel)
    if chown:  # as if the account had written them
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), UID, UID)


def test_delete_missing_args(target: TargetContainer, dst: Path, rsync: Rsync, workdir: Path) -> None:
    """The daemon's batch delete. Refused by Debian's 3.2.7 once an entry with a file type went before
    the missing one (here the implied directory ``a``); a missing entry first slips through."""
    src = workdir / "src"
    fill(src, ["a/keep.txt"])
    fill(dst, ["a/keep.txt", "a/gone.txt", "gone-top.txt"], chown=True)
    args = ("--from0", "--files-from=-", "--delete-missing-args", "--force")
    nested = rsync(src, *args, stdin=b"a/gone.txt\0")
    if target.version.rsync == "3.2.7":
        assert nested.returncode == 2, nested
        # The receiver's message races its exit: on a loaded machine it is sometimes lost (exit 2, no text).
        assert "invalid file mode 00 for a/gone.txt [Receiver]" in nested.stderr or not nested.stderr, nested
        assert (dst / "a/gone.txt").exists()
    else:
        assert nested.returncode == 0, nested
        assert not (dst / "a/gone.txt").exists()
    # A first entry of mode 0 is sent as "same mode as the last one" (which starts at 0) and never checked:
    # a probe made of one missing top-level name cannot tell the receivers apart.
    top = rsync(src, *args, stdin=b"gone-top.txt\0")
    assert top.returncode == 0, top
    assert not (dst / "gone-top.txt").exists()


ODD = (
    "x",
    "with space.jpg",
    "new\nline.jpg",
    "[*?\\].jpg",
    "x[ab].jpg",
    "back\\slash.jpg",
    "+ x",
    "- y",
    "R risk",
    "#comment",
    ";comment",
    " leading space",
    "trailing space ",
    "ünïcödé-日本.jpg",
)
BYSTANDERS = ("xa.jpg", "x[ab].jpg-bystander", "x-bystander", "d-bystander/f", "only-on-target.txt")


def test_delete_as_filter_rules(dst: Path, rsync: Rsync, workdir: Path) -> None:
    """``rsync -r --delete`` scoped by filter rules to the parents of what to delete, on every version."""
    src = workdir / "src"
    fill(src, ["a/b/keep.txt", "a/sub with [x]/keep.txt"])
    gone = [*(f"a/b/{name}" for name in ODD), "a/b/d/f1", "a/b/d/sub/f2", "a/sub with [x]/x*"]
    fill(dst, ["a/b/keep.txt", "a/sub with [x]/keep.txt", *gone, *(f"a/b/{b}" for b in BYSTANDERS)], chown=True)
    fill(dst, BYSTANDERS, chown=True)
    before = tree(dst)
    deletes = [*(f"a/b/{name}" for name in ODD), "a/b/d", "a/sub with [x]/x*"]
    rules = delete_rules(deletes)
    stdin = b"".join(os.fsencode(rule) + b"\0" for rule in rules)
    proc = rsync(src, "-r", "--delete", "--from0", "--filter=. -", "--itemize-changes", stdin=stdin)
    assert proc.returncode == 0, proc
    assert proc.stderr == ""
    after = tree(dst)
    removed = {p for p in before if p not in after}
    assert removed == {p for p in before if any(p == d or p.startswith(d + "/") for d in deletes)}
    assert removed and not set(after) - set(before), "nothing sent"


def test_filter_rule_delete_of_a_directory_needs_its_contents(dst: Path, rsync: Rsync, workdir: Path) -> None:
    """``R /a/d`` alone protects what is inside: rsync keeps the directory, says so, and exits 0."""
    src = workdir / "src"
    fill(src, ["a/keep.txt"])
    fill(dst, ["a/keep.txt", "a/d/f1", "a/d/sub/f2"], chown=True)
    stdin = b"".join(os.fsencode(rule) + b"\0" for rule in ("R /a/d", "+ /a/", "- *"))
    proc = rsync(src, "-r", "--delete", "--from0", "--filter=. -", stdin=stdin)
    assert proc.returncode == 0, proc
    assert "cannot delete non-empty directory: a/d" in proc.stdout + proc.stderr
    assert (dst / "a/d/sub/f2").exists()
