"""rsync filter rules: match ``SYNC_EXCLUDE`` patterns the way rsync does, and write rules for rsync.

Two jobs, both about rsync's own pattern language (``man rsync``, "PATTERN MATCHING RULES"):

* :class:`Excludes` decides, in the planner, whether a path is excluded: rsync's recursion never enters an
  excluded directory, so a path is excluded when it *or any of its parent directories* matches. With
  ``--files-from`` rsync matches each listed path on its own name only, so ``/cache/`` would not cover
  ``cache/x``; the planner drops such paths itself, and :meth:`Excludes.rsync_args` adds a ``/**`` twin of
  every pattern so rsync agrees even for a path it is handed directly.
* :func:`delete_rules` writes the rules of a *scoped delete*: ``--delete`` limited to named paths, which
  every rsync a target may run accepts (3.2.x receivers reject ``--delete-missing-args`` entries).

No library implements rsync's semantics (gitignore's, which ``pathspec`` implements, differ: an unanchored
``a/b`` is anchored there, ``**`` is special only as a whole component); a test compares this matcher with
real rsync on a table of patterns and names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

__all__ = ["Excludes", "delete_rules", "pattern_error", "rule"]

_WILD = re.compile(r"[*?\[]")
# POSIX classes rsync's wildmatch knows, as Python character-class bodies.
_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}


def pattern_error(pattern: str) -> str:
    """Why rsync would not take ``pattern`` as a plain exclude ('' when it is fine).

    Example:
        >>> pattern_error("+ keep"), pattern_error("/cache/")
        ('a leading "+ " makes it an include rule', '')
    """
    if pattern.startswith(("+ ", "- ")):
        return f'a leading "{pattern[:2]}" makes it an include rule' if pattern[0] == "+" else "a rule prefix"
    if pattern == "!":
        return '"!" clears the list'
    if "\n" in pattern or "\r" in pattern or "\0" in pattern:
        return "a newline or NUL"
    if pattern.count("[") > pattern.count("]"):
        return "an unclosed ["
    return ""


def _class_end(pattern: str, start: int) -> int:
    """Index just past the ``]`` closing the class opened at ``start`` (-1: not closed)."""
    i = start + 1
    if i < len(pattern) and pattern[i] in "!^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1  # a leading ] is literal
    while i < len(pattern):
        if pattern.startswith("[:", i):
            close = pattern.find(":]", i + 2)
            if close != -1:
                i = close + 2
                continue
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "]":
            return i + 1
        i += 1
    return -1


def _class_regex(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    out = []
    i = 0
    while i < len(body):
        if body.startswith("[:", i) and (close := body.find(":]", i + 2)) != -1:
            out.append(_CLASSES.get(body[i + 2 : close], ""))
            i = close + 2
            continue
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(re.escape(body[i + 1]))
            i += 2
            continue
        out.append(ch if ch == "-" else re.escape(ch))
        i += 1
    # In rsync, a class never matches "/" (wildmatch with slashes special).
    return f"[^/{''.join(out)}]" if negate else f"(?!/)[{''.join(out)}]"


def _regex(pattern: str) -> str:
    """The regular expression for one wildcard pattern (no anchoring)."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                while i < len(pattern) and pattern[i] == "*":
                    i += 1
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := _class_end(pattern, i)) != -1:
            out.append(_class_regex(pattern[i + 1 : end - 1]))
            i = end
            continue
        elif ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Pattern:
    text: str

    @cached_property
    def compiled(self) -> tuple[re.Pattern[str], bool, bool, bool, bool]:
        """(regex, anchored, whole path, directories only, '/***' form)."""
        body = self.text
        triple = body.endswith("/***")
        if triple:
            body = body[:-4]
        dir_only = body.endswith("/") and not triple
        body = body.rstrip("/") if dir_only else body
        anchored = body.startswith("/")
        body = body.lstrip("/") if anchored else body
        whole = "/" in body or "**" in body or triple
        rx = _regex(body) if _WILD.search(body) else re.escape(body)
        return re.compile(rx + r"\Z", re.S), anchored, whole, dir_only, triple

    def matches(self, path: str, is_dir: bool) -> bool:
        rx, anchored, whole, dir_only, triple = self.compiled
        if dir_only and not is_dir:
            return False
        if triple and not is_dir:
            return False  # dir/*** names the directory itself; what is below is excluded through it
        if anchored:
            return rx.match(path) is not None
        if not whole:
            return rx.match(path.rsplit("/", 1)[-1]) is not None
        # Unanchored with a slash: matched against the end of the path, at any component boundary.
        starts = [0] + [i + 1 for i, c in enumerate(path) if c == "/"]
        return any(rx.match(path, s) is not None for s in starts)


class Excludes:
    """``SYNC_EXCLUDE`` patterns, applied as rsync's recursion applies them.

    Example:
        >>> ex = Excludes(["/cache/", "*.tmp"])
        >>> ex.excluded("cache/x/y.jpg", False), ex.excluded("a/cache/x", False), ex.excluded("a/b.tmp", False)
        (True, False, True)
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = [_Pattern(p) for p in self.patterns]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, path: str, is_dir: bool) -> bool:
        """Does a pattern match ``path`` itself (not its parents)?"""
        return any(p.matches(path, is_dir) for p in self._compiled)

    def excluded(self, path: str, is_dir: bool) -> bool:
        """Is ``path`` (relative to the source) or one of its parent directories excluded?"""
        if not self._compiled:
            return False
        if self.matches(path, is_dir):
            return True
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if self.matches(parent, True):
                return True
        return False

    def rsync_args(self) -> list[str]:
        """``--exclude`` options: each pattern and a ``/**`` twin, so paths listed with ``--files-from``
        below an excluded directory are excluded too (rsync checks a listed path on its own name only)."""
        args = []
        for p in self.patterns:
            args.append(f"--exclude={p}")
            stem = p.rstrip("/")
            if stem and not stem.endswith("/***") and not stem.endswith("/**"):
                args.append(f"--exclude={stem}/**")
        return args


def _escape(name: str) -> str:
    return re.sub(r"([\\*?\[])", r"\\\1", name)


def rule(kind: str, path: str, suffix: str = "") -> str:
    """One filter rule naming exactly ``/path`` (plus a ``suffix`` such as ``/***``), whatever the name.

    A backslash escapes only in a pattern with wildcards, so the name is escaped exactly when the whole
    pattern has one (its own, or the suffix's).

    Example:
        >>> rule("R", "a/[x]"), rule("R", "a\\\\b"), rule("R", "a\\\\b", "/***")
        ('R /a/\\\\[x]', 'R /a\\\\b', 'R /a\\\\\\\\b/***')
    """
    wild = bool(_WILD.search(path) or _WILD.search(suffix))
    return f"{kind} /{_escape(path) if wild else path}{suffix}"


def delete_rules(delete: Iterable[str], user: Sequence[str] = ()) -> bytes:
    """Rules (NUL-separated, for ``--from0 --filter='merge -'``) that make ``rsync -r --delete`` remove
    exactly the ``delete`` paths and nothing else.

    Each path is hidden from the sender (``H``: even one that still exists there, such as a symlink that
    points out of the tree, is then missing from the sender's list) and put at risk on the receiver
    (``R``, the path and, for a directory, everything below it). Its parent directories are included so
    the transfer reaches them; everything else is excluded, which on the receiver also protects it from
    the delete. The user's own excludes come first: an excluded path is never deleted.

    Example:
        >>> delete_rules(["2026/12/b.jpg"]).split(b"\\0")
        [b'H /2026/12/b.jpg', b'R /2026/12/b.jpg', b'R /2026/12/b.jpg/***', b'+ /2026/', b'+ /2026/12/', b'- *', b'']
    """
    rules: list[str] = [f"- {p}" for p in user]
    parents: dict[str, None] = {}
    for path in sorted(set(delete)):
        rules += [rule("H", path), rule("R", path), rule("R", path, "/***")]
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parents.setdefault("/".join(parts[:i]), None)
    rules += [rule("+", p, "/") for p in sorted(parents, key=lambda p: (p.count("/"), p))]
    rules.append("- *")
    return b"".join(r.encode("utf-8", "surrogateescape") + b"\0" for r in rules)
