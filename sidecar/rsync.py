"""Build rsync command lines, run them, and classify how they ended.

Every option used here is accepted by a target account restricted with ``rrsync -wo``: nothing needs
a remote shell. Files land through rsync's temporary file and rename (never ``--inplace``), so a
reader never sees half a file; symlinks that point outside the tree are not copied (``--safe-links``).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Outcome",
    "Result",
    "Rsync",
    "Stats",
    "classify",
    "parse_skipped_deletes",
    "parse_stats",
    "skipped_paths",
]


@dataclass(frozen=True)
class Stats:
    """What one rsync run moved (from ``--stats``)."""

    files: int = 0
    bytes: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Outcome:
    """How a run ended.

    Attributes:
        kind: ``ok``; ``vanished`` (24: files vanished meanwhile, fine, re-check them); ``skipped``
            (23 caused only by unreadable source files, which are reported); ``delete_limit`` (25);
            ``retry`` (network, protocol, partial transfer, disk full ...); ``fatal`` (usage errors,
            options the target refuses: retrying cannot help).
        reason: the ``reason`` metrics label.
        message: one line for the log.
    """

    kind: str
    reason: str = ""
    message: str = ""


def _num(text: str) -> int:
    return int(text.replace(",", "").replace(".", ""))


_STAT_RE = {
    "files": re.compile(r"^Number of regular files transferred: ([\d,.]+)", re.M),
    "bytes": re.compile(r"^Total transferred file size: ([\d,.]+)", re.M),
    "deleted": re.compile(r"^Number of deleted files: ([\d,.]+)", re.M),
}
_SKIPPED_DELETES = re.compile(r"Deletions stopped due to --max-delete limit \(([\d,.]+) skipped\)")


def parse_stats(stdout: str) -> Stats:
    """Parse rsync's ``--stats`` block.

    Example:
        >>> parse_stats("Number of deleted files: 2 (reg: 2)\\nNumber of regular files transferred: 1,204\\n"
        ...             "Total transferred file size: 65,536 bytes\\n")
        Stats(files=1204, bytes=65536, deleted=2)
    """
    found = {k: _num(m.group(1)) for k, rx in _STAT_RE.items() if (m := rx.search(stdout))}
    return Stats(**found)


def parse_skipped_deletes(text: str) -> int | None:
    """How many deletions ``--max-delete`` held back, or None if it did not stop any."""
    match = _SKIPPED_DELETES.search(text)
    return _num(match.group(1)) if match else None


def _summary(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in stderr:
        # A crash of the remote rrsync: its last line names the error, the frames do not help.
        frames = [ln for ln in lines if ln.startswith(("Traceback", "File ", "^")) or ln.startswith("  ")]
        lines = [ln for ln in lines if ln not in frames and not ln.startswith(("lock_", "fd =", "os."))]
    useful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = " | ".join(dict.fromkeys(useful[:4]))
    return text[:600]


# Source paths rsync could not read: skipped and reported, not worth a retry (a retry would fail alike).
_SENDER_SKIP = re.compile(
    r"^rsync: \[sender\] .*(Permission denied|No such file or directory|File name too long) \(\d+\)$"
)
_QUOTED = re.compile(r'"(.+)"')


def skipped_paths(stderr: str) -> list[tuple[str, str]]:
    """``(absolute path, reason)`` for each source path rsync could not read.

    Example:
        >>> skipped_paths('rsync: [sender] send_files failed to open "/s/x": Permission denied (13)')
        [('/s/x', 'unreadable')]
    """
    found = []
    for line in (ln.strip() for ln in stderr.splitlines()):
        m = _QUOTED.search(line)
        if m and _SENDER_SKIP.match(line):
            why = "unreadable" if "Permission denied" in line else line.rsplit(": ", 1)[-1].split(" (")[0]
            found.append((m.group(1), why))
    return found


_NETWORK = (
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Could not resolve hostname",
    "Network is unreachable",
    "Connection closed",
    "Connection reset",
    "Broken pipe",
    "connection unexpectedly closed",
    "Name or service not known",
    "Temporary failure in name",
)


def classify(returncode: int, stderr: str) -> Outcome:
    """Classify an rsync exit (code plus what it printed).

    Example:
        >>> classify(24, "file has vanished").kind, classify(1, "syntax").kind, classify(12, "").kind
        ('vanished', 'fatal', 'retry')
    """
    msg = _summary(stderr)
    if returncode == 0:
        return Outcome("ok")
    if "rrsync error" in stderr or "rrsync:" in stderr or 'File "/usr/bin/rrsync"' in stderr:
        if "Another instance of rrsync" in stderr:
            return Outcome("retry", "busy", "another rsync is writing to this target (rrsync lock): " + msg)
        if "Restricted directory does not exist" in stderr or "FileNotFoundError" in stderr:
            return Outcome("fatal", "target_path", "the target's rrsync directory does not exist: " + msg)
        return Outcome("fatal", "rejected", "the target's rrsync refused the transfer: " + msg)
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return Outcome("retry", "host_key", msg)
    if "Permission denied (publickey" in stderr:
        return Outcome("retry", "auth", msg)
    if "No space left on device" in stderr or "Disk quota exceeded" in stderr:
        return Outcome("retry", "disk_full", "the target is out of space: " + msg)
    if returncode == 24:
        return Outcome("vanished", "", msg)
    if returncode == 25:
        return Outcome("delete_limit", "delete_guard", msg)
    if returncode == 23:
        errors = [ln.strip() for ln in stderr.splitlines() if ln.startswith("rsync:")]
        if errors and all(_SENDER_SKIP.match(e) or "some files/attrs were not transferred" in e for e in errors):
            return Outcome("skipped", "", msg)
        return Outcome("retry", "partial", msg)
    if returncode in (1, 2, 4):
        return Outcome("fatal", "usage", msg or f"rsync exited {returncode} (usage error)")
    if returncode == 3:
        return Outcome("retry", "target_path", msg)
    if returncode in (30, 35):
        return Outcome("retry", "timeout", msg)
    if any(word in stderr for word in _NETWORK) or returncode in (5, 10, 12, 255):
        return Outcome("retry", "network", msg or f"rsync exited {returncode}")
    return Outcome("retry", "error", msg or f"rsync exited {returncode}")


class Rsync:
    """rsync invocations for one target.

    Args:
        source: the source directory.
        dest: ``user@host:/path/``.
        shell: the ``-e`` value (the multiplexed ssh).
        chmod: ``--chmod`` rules ('' keeps the source's modes).
        excludes: rsync exclude patterns.
        io_timeout: ``--timeout`` seconds.
    """

    def __init__(
        self, source: str, dest: str, shell: str, chmod: str, excludes: Sequence[str], io_timeout: int
    ) -> None:
        self.source = source.rstrip("/") + "/"
        self.dest = dest
        common = ["rsync", "-e", shell, "--links", "--safe-links", "--times", "--omit-dir-times", "--perms"]
        # Uploads (images, media) do not change by a few blocks: rsync's delta algorithm would only cost
        # a read and checksum of the target's old copy. Whole files are faster on any LAN.
        common.append("--whole-file")
        if chmod:
            common.append(f"--chmod={chmod}")
        common += [f"--timeout={io_timeout}", "--stats"]
        common += [f"--exclude={pattern}" for pattern in excludes]
        self._common = common
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._aborted = False

    def batch_args(self, delete: bool, max_delete: int) -> list[str]:
        """Send exactly the listed paths (NUL-separated on stdin); missing ones are deleted."""
        # --ignore-times: every listed path did change. rsync's quick check compares whole seconds
        # (rrsync refuses the nanosecond --modify-window), so a same-size rewrite within the second
        # the previous copy was made would otherwise be skipped.
        args = [*self._common, "--from0", "--files-from=-", "--ignore-times"]
        if delete:
            args += ["--delete-missing-args", "--force", f"--max-delete={max_delete}"]
        else:
            args.append("--ignore-missing-args")
        return [*args, self.source, self.dest]

    def full_args(self, delete: bool, max_delete: int) -> list[str]:
        """The whole tree; ``max_delete=0`` counts the deletions it would make without making any.

        Unchanged files are skipped by size and modification time (whole seconds), as in any rsync.
        """
        args = [*self._common, "--recursive"]
        if delete:
            args += ["--delete", f"--max-delete={max_delete}"]
        return [*args, self.source, self.dest]

    def run(self, args: list[str], stdin: bytes = b"") -> Result:
        """Run rsync to the end (or until :meth:`abort`)."""
        start = time.monotonic()
        env = dict(os.environ, LC_ALL="C")
        with self._lock:
            if self._aborted:
                return Result(20, "", "aborted: shutting down", 0.0)
            # Own session: a terminal's Ctrl-C must not kill the transfer we flush on shutdown.
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self._proc = proc
        try:
            out, err = proc.communicate(stdin)
        finally:
            with self._lock:
                self._proc = None
        return Result(
            proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - start
        )

    def abort(self) -> None:
        """Stop the running transfer (shutdown past its grace period); later runs fail at once."""
        with self._lock:
            self._aborted = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
