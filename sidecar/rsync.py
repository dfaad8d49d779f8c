"""Build rsync command lines, run them, and classify how they ended.

Every option used here is accepted by a target account restricted with ``rrsync -wo``: nothing needs a
remote shell. Files land through rsync's temporary file and rename (never ``--inplace``), so a reader never
sees half a file; symlinks that point outside the tree are never copied (``--safe-links``, and the planner
retracts them).

Removals take one of two forms (:data:`MISSING_ARGS`, :data:`RULES`). ``--delete-missing-args`` lists the
missing paths, needs no directory scan, and is what rsync >= 3.4 receivers take; Debian 12's own rsync
3.2.7 (and other 3.2.x) rejects such entries below an existing directory (``invalid file mode 00``,
protocol incompatibility), so for those receivers, and for paths still present in the source, removals are
``--delete`` scoped by filter rules (:func:`sidecar.filters.delete_rules`), which every rsync takes. Which
one a receiver takes is found out by :meth:`Rsync.probe_args`, a harmless dry run, on each new connection.

Every removal is counted first with a dry run (``-n``, rsync counts what is below a deleted directory too),
so a sync over the delete guard's limits deletes nothing at all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .filters import Excludes
from .sandbox import Confinement

__all__ = [
    "MISSING_ARGS",
    "PARTIAL_DIR",
    "RULES",
    "Outcome",
    "Result",
    "Rsync",
    "Slots",
    "Stats",
    "classify",
    "in_the_way",
    "over_delete_limit",
    "parse_itemized",
    "parse_stats",
    "receiver_version",
    "skipped_paths",
]

MISSING_ARGS = "missing-args"
RULES = "rules"
# A dry run below an existing directory: the entry 3.2.x receivers reject. Made in an empty private
# directory, so nothing is read from the source and nothing is written on the target.
PROBE_DIR = ".upsync-probe"
PROBE_NAME = f"{PROBE_DIR}/missing"
# Where a full sync with SYNC_RESUME keeps a file cut mid-transfer on the target (rsync --partial-dir). A
# reserved name: never sent (the planner skips it, full syncs hide it) and never served (nginx denies dotfiles).
PARTIAL_DIR = ".upsync-partial"


@dataclass(frozen=True)
class Stats:
    """What one rsync run moved or would move (from ``--stats``).

    Attributes:
        files: regular files transferred.
        bytes: their size.
        deleted: entries deleted on the receiver (files and directories, everything below included).
        created: entries created on the receiver.
        total: entries in the sender's list (files, directories, links).
    """

    files: int = 0
    bytes: int = 0
    deleted: int = 0
    created: int = 0
    total: int = 0

    def __add__(self, other: Stats) -> Stats:
        return Stats(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int, int, int]:
        return (self.files, self.bytes, self.deleted, self.created, self.total)


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
            (23 caused only by unreadable source files, which are reported); ``delete_limit`` (25, or 23 because a
            directory on the target is in the way of what replaced it and this run may not delete it);
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
    "created": re.compile(r"^Number of created files: ([\d,.]+)", re.M),
    "total": re.compile(r"^Number of files: ([\d,.]+)", re.M),
}
_NO_DELETES = "IO error encountered -- skipping file deletion"
_VERSION = re.compile(r"\[(?:Receiver|receiver|server|generator)=([0-9][0-9A-Za-z.+~-]*)\]")


def parse_stats(stdout: str) -> Stats:
    """Parse rsync's ``--stats`` block.

    Example:
        >>> parse_stats("Number of files: 9 (reg: 8, dir: 1)\\nNumber of created files: 2\\n"
        ...             "Number of deleted files: 2 (reg: 2)\\nNumber of regular files transferred: 1,204\\n"
        ...             "Total transferred file size: 65,536 bytes\\n")
        Stats(files=1204, bytes=65536, deleted=2, created=2, total=9)
    """
    found = {k: _num(m.group(1)) for k, rx in _STAT_RE.items() if (m := rx.search(stdout))}
    return Stats(**found)


def parse_itemized(stdout: str) -> tuple[list[str], list[str]]:
    """(files sent, paths deleted) from ``--out-format='%i %n'`` lines.

    Example:
        >>> parse_itemized("<f+++++++++ 2026/a.jpg\\n*deleting   old/\\ncd+++++++++ 2026/\\nNumber of files: 2\\n")
        (['2026/a.jpg'], ['old/'])
    """
    sent, deleted = [], []
    for line in stdout.splitlines():
        if line.startswith("*deleting"):
            deleted.append(line[len("*deleting") :].strip())
        elif len(line) > 12 and line[0] in "<>" and line[1] == "f" and line[11] == " ":
            sent.append(line[12:])
    return sent, deleted


def receiver_version(stderr: str) -> str:
    """The receiver's rsync version when it named it (rsync prints it only in its own error lines).

    Example:
        >>> receiver_version("rsync error: protocol incompatibility (code 2) at flist.c(874) [Receiver=3.2.7]")
        '3.2.7'
    """
    m = _VERSION.search(stderr)
    return m.group(1) if m else ""


def _summary(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in stderr:
        # A crash of the remote rrsync: its last line names the error, the frames do not help.
        frames = [ln for ln in lines if ln.startswith(("Traceback", "File ", "^")) or ln.startswith("  ")]
        lines = [ln for ln in lines if ln not in frames and not ln.startswith(("lock_", "fd =", "os."))]
    useful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = " | ".join(dict.fromkeys(useful[:4]))
    return "".join(c if c.isprintable() else "?" for c in text[:600])


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
        if re.search(r"option --(delete|remove)\S* has been disabled", stderr):
            return Outcome(
                "fatal",
                "rejected",
                "the target refuses deletes (rrsync -no-del in its authorized_keys command): remove -no-del there, "
                "or set SYNC_DELETE=false here: " + msg,
            )
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
        only_skips = all(_SENDER_SKIP.match(e) or "some files/attrs were not transferred" in e for e in errors)
        if only_skips and (in_the_way(stderr) or over_delete_limit(stderr)):
            # Something on the target is in the way and removing it is a delete this run may not make (a
            # send, or a full sync whose deletes were refused or are off): a counted full sync's to do.
            return Outcome("delete_limit", "delete_guard", msg)
        if errors and only_skips:
            return Outcome("skipped", "", msg)
        return Outcome("retry", "partial", msg)
    if returncode == 2 and ("invalid file mode" in stderr or "protocol incompatibility" in stderr):
        version = receiver_version(stderr)
        return Outcome(
            "fatal",
            "protocol",
            f"the receiver (rsync {version or 'of another version'}) does not understand this transfer: {msg}",
        )
    if returncode in (126, 127) and stderr.startswith("upsync-landlock:"):
        # The sandbox's exec helper could not confine rsync (or run it): nothing was run, and retrying the
        # same start cannot help.
        return Outcome(
            "fatal",
            "sandbox",
            f"the sender's sandbox could not start rsync: {msg} (check the image's /opt/upsync/bin/upsync-landlock; "
            "SYNC_SANDBOX=off runs without the sandbox, see docs/security.md)",
        )
    if returncode in (1, 2, 4):
        return Outcome("fatal", "usage", msg or f"rsync exited {returncode} (usage error)")
    if returncode == 3:
        return Outcome("retry", "target_path", msg)
    if returncode in (30, 35):
        return Outcome("retry", "timeout", msg)
    if any(word in stderr for word in _NETWORK) or returncode in (5, 10, 12, 255):
        return Outcome("retry", "network", msg or f"rsync exited {returncode}")
    return Outcome("retry", "error", msg or f"rsync exited {returncode}")


_IN_THE_WAY = re.compile(r"^could not make way for (?:new )?[a-z ]+?: (.+)$", re.MULTILINE)
_DELETE_LIMIT = "Deletions stopped due to --max-delete limit"


def in_the_way(stderr: str) -> list[str]:
    """Paths rsync could not place because something on the target is in the way that this run may not delete
    (a directory where a file or link goes now).

    Example:
        >>> in_the_way("cannot delete non-empty directory: 2019\\ncould not make way for new regular file: 2019\\n"
        ...            "could not make way for new symlink: a b/c\\nrsync error: some files/attrs were not transferred")
        ['2019', 'a b/c']
    """
    return _IN_THE_WAY.findall(stderr)


def over_delete_limit(stderr: str) -> bool:
    """rsync stopped deleting at ``--max-delete`` (more to delete than the run was allowed)."""
    return _DELETE_LIMIT in stderr


def deletions_skipped(stderr: str) -> bool:
    """rsync skipped every deletion because the sender hit an I/O error (an unreadable directory)."""
    return _NO_DELETES in stderr


def _stream(proc: subprocess.Popen[bytes], stdin: bytes, on_output: Callable[[bytes], bool]) -> tuple[bytes, bytes]:
    """:meth:`Popen.communicate`, but stdout is handed over line by line as it comes. Threads write stdin and
    drain stderr, so a large stdin or a chatty stderr cannot deadlock the reading."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    pipe_in, pipe_err = proc.stdin, proc.stderr
    errors: list[bytes] = []

    def feed() -> None:
        try:
            pipe_in.write(stdin)
        except (BrokenPipeError, ValueError):
            pass  # rsync ended early: its exit code says why
        finally:
            with contextlib.suppress(OSError):
                pipe_in.close()

    def drain() -> None:
        errors.append(pipe_err.read())

    helpers = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for helper in helpers:
        helper.start()
    kept: list[bytes] = []
    rest = b""
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        *lines, rest = _LINE_END.split(rest + chunk)
        for line in lines:
            if line and not _consumed(on_output, line):
                kept.append(line)
    if rest and not _consumed(on_output, rest):
        kept.append(rest)
    proc.wait()
    for helper in helpers:
        helper.join()
    return b"\n".join([*kept, b""]), errors[0] if errors else b""


_LINE_END = re.compile(rb"[\r\n]")


def _consumed(on_output: Callable[[bytes], bool], line: bytes) -> bool:
    # A fault in the line handler must not stop the reading (rsync would block on a full pipe).
    try:
        return on_output(line)
    except Exception:
        return False


class Slots:
    """A bound on rsync runs using the CPU at once (``SYNC_MAX_PARALLEL``), so 64 targets do not thrash two
    cores. A run holds its slot for at most ``hold_s``: a long full sync or a transfer stuck on a dead node
    is waiting on the network, not using the CPU, and must not make other targets wait.

    One reaper thread hands overdue slots on, for every run: a timer thread per run cost ~0.3 ms of the
    daemon's CPU per rsync and a GIL hand-off or two, at the moment 16 or 64 targets start theirs (W6).

    Args:
        size: runs at once (at least 1).
        hold_s: longest a run keeps its slot.
    """

    def __init__(self, size: int, hold_s: float = 1.0) -> None:
        self.size = max(1, size)
        self.hold_s = hold_s
        self._sem = threading.BoundedSemaphore(self.size)
        self._cond = threading.Condition()
        # Ticket -> deadline. hold_s is the same for every run, so insertion order is deadline order.
        self._held: dict[int, float] = {}
        self._tickets = itertools.count()
        self._reaper: threading.Thread | None = None

    def acquire(self) -> Callable[[], None]:
        """Take a slot; returns its (idempotent) release."""
        self._sem.acquire()
        ticket = next(self._tickets)
        with self._cond:
            idle = not self._held
            self._held[ticket] = time.monotonic() + self.hold_s
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="slots", daemon=True)
                self._reaper.start()
            elif idle:
                self._cond.notify()  # it waits without a deadline while no slot is held

        def release() -> None:
            with self._cond:
                if self._held.pop(ticket, None) is not None:
                    self._sem.release()

        return release

    def _reap(self) -> None:
        with self._cond:
            while True:
                if not self._held:
                    self._cond.wait()
                    continue
                ticket, deadline = next(iter(self._held.items()))
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)  # released meanwhile or not: look again
                    continue
                del self._held[ticket]
                self._sem.release()


class Rsync:
    """rsync invocations for one target.

    Args:
        source: the source directory.
        dest: ``user@host:/path/``.
        shell: the ``-e`` value (the multiplexed ssh).
        chmod: ``--chmod`` rules ('' keeps the source's modes).
        excludes: ``SYNC_EXCLUDE``.
        io_timeout: ``--timeout`` seconds.
        confine: gives how each rsync child is started in the sender's sandbox (``SourceSandbox.confinement``),
            or None.
        slots: bounds runs across targets, or None.
        bwlimit: ``SYNC_BWLIMIT`` ("0": none).
        resume: ``SYNC_RESUME``: full syncs keep and reuse partial files.
        itemize: list what each run sent and deleted (``--out-format``), for the hooks.
    """

    def __init__(
        self,
        source: str,
        dest: str,
        shell: str,
        chmod: str,
        excludes: Excludes,
        io_timeout: int,
        confine: Callable[[], Confinement] | None = None,
        slots: Slots | None = None,
        bwlimit: str = "0",
        resume: bool = False,
        itemize: bool = False,
    ) -> None:
        self.source = source.rstrip("/") + "/"
        self.resume = resume
        self.itemize = itemize
        self.dest = dest
        self.excludes = excludes
        common = ["rsync", "-e", shell, "--links", "--safe-links", "--times", "--omit-dir-times", "--perms"]
        # Uploads (images, media) do not change by a few blocks: rsync's delta algorithm would only cost
        # a read and checksum of the target's old copy. Whole files are faster on any LAN.
        common.append("--whole-file")
        if chmod:
            common.append(f"--chmod={chmod}")
        common += [f"--timeout={io_timeout}", "--stats"]
        if bwlimit != "0":
            common.append(f"--bwlimit={bwlimit}")
        self._common = common
        self.confine = confine
        self.slots = slots
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._aborted = False

    # ----- command lines -----------------------------------------------------------------------------

    def send_args(self) -> list[str]:
        """Send exactly the listed paths (NUL-separated on stdin); a path gone meanwhile is skipped."""
        # --ignore-times: every listed path did change. rsync's quick check compares whole seconds
        # (rrsync refuses the nanosecond --modify-window), so a same-size rewrite within the second
        # the previous copy was made would otherwise be skipped. No --force, and --max-delete=0: a send deletes
        # nothing that holds files (it still replaces one file, link or empty directory by what took its name,
        # as any copy does). A directory on the target that the source replaced by a file or a link stays in the way
        # ("could not make way", see classify): with --force, one changed path ("2019", moved away and
        # written again as a file) deleted the whole directory below it, uncounted and past the delete
        # guard. That delete is a full sync's to count and guard.
        args = [*self._common, *self.excludes.rsync_args(), "--from0", "--files-from=-", "--ignore-times"]
        args += self._itemized()
        return [*args, "--ignore-missing-args", "--max-delete=0", self.source, self.dest]

    def remove_args(self, method: str, count_only: bool, max_delete: int = 0) -> list[str]:
        """Remove paths on the target: listed on stdin (:data:`MISSING_ARGS`, NUL-separated missing paths)
        or by rules on stdin (:data:`RULES`, :func:`sidecar.filters.delete_rules`).
        ``count_only``: a dry run whose ``--stats`` count what would go."""
        args = [*self._common, *self.excludes.rsync_args(), "--from0"]
        if method == MISSING_ARGS:
            args += ["--files-from=-", "--delete-missing-args", "--force"]
        else:
            args += ["--recursive", "--delete", "--filter=merge -"]
        args += ["--dry-run"] if count_only else [f"--max-delete={max_delete}", *self._itemized()]
        return [*args, self.source, self.dest]

    def full_args(
        self, delete: bool, count_only: bool, max_delete: int = 0, itemize: bool = False, progress: bool = False
    ) -> list[str]:
        """The whole tree, with this run's own rules on stdin (unreadable directories kept out, paths to
        retract hidden from the sender). Unchanged files are skipped by size and modification time (whole
        seconds), as in any rsync. ``count_only``: a dry run counting what a delete would remove;
        ``itemize``: one line per change (see :func:`parse_itemized`); ``progress``: rsync's overall
        progress lines too (``--info=progress2``, see :mod:`sidecar.progress`)."""
        args = [*self._common, *[f"--exclude={p}" for p in self.excludes.patterns], "--recursive"]
        # The partial directory is never sent; "p" (perishable): it does not keep a directory being deleted.
        args.append(f"--filter=-p {PARTIAL_DIR}/")
        if self.resume:
            # Delta transfers: with --whole-file rsync throws a partial file away instead of resuming it.
            args += [f"--partial-dir={PARTIAL_DIR}", "--no-whole-file"]
        if itemize or (self.itemize and not count_only):
            args.append("--out-format=%i %n")
        if progress and not count_only:
            args.append("--info=progress2")
        args += ["--from0", "--filter=merge -"]
        if delete:
            args.append("--delete")
            args += ["--dry-run"] if count_only else [f"--max-delete={max_delete}"]
        elif count_only:
            args.append("--dry-run")
        return [*args, self.source, self.dest]

    def probe_args(self, empty_dir: str) -> list[str]:
        """A dry run that only a receiver taking ``--delete-missing-args`` below a directory survives.

        Run with ``PROBE_NAME`` on stdin from ``empty_dir`` (which holds an empty ``PROBE_DIR``)."""
        return [
            *self._common,
            "--from0",
            "--files-from=-",
            "--delete-missing-args",
            "--dry-run",
            empty_dir.rstrip("/") + "/",
            self.dest,
        ]

    def _itemized(self) -> list[str]:
        return ["--out-format=%i %n"] if self.itemize else []

    # ----- running -----------------------------------------------------------------------------------

    def run(
        self,
        args: list[str],
        stdin: bytes = b"",
        sandboxed: bool = True,
        on_output: Callable[[bytes], bool] | None = None,
    ) -> Result:
        """Run rsync to the end (or until :meth:`abort`), in the sandbox and within the slots.

        ``on_output``: stream mode; called with each line of stdout (ended by ``\\n`` or ``\\r``) as it comes,
        returns True when it consumed the line (the rest, the stats, is the result's stdout)."""
        start = time.monotonic()
        env = dict(os.environ, LC_ALL="C")
        confinement = self.confine() if sandboxed and self.confine else Confinement()
        release = self.slots.acquire() if self.slots else (lambda: None)
        try:
            with self._lock:
                if self._aborted:
                    return Result(20, "", "aborted: shutting down", 0.0)
                # Own session: a terminal's Ctrl-C must not kill the transfer we flush on shutdown.
                proc = subprocess.Popen(
                    confinement.argv(args),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                    pass_fds=confinement.pass_fds,
                    preexec_fn=confinement.preexec_fn,  # None with the helper, so Python can vfork: sidecar.sandbox
                )
                self._proc = proc
            # After hold_s the run is waiting on the network, not the CPU: the slots' reaper hands its slot to
            # another target. (Not communicate(timeout=): communicate cannot resume writing stdin after one.)
            try:
                out, err = proc.communicate(stdin) if on_output is None else _stream(proc, stdin, on_output)
            finally:
                with self._lock:
                    self._proc = None
        finally:
            release()
        return Result(
            proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - start
        )

    def abort(self) -> None:
        """Stop the running transfer (shutdown past its grace period); later runs fail at once."""
        with self._lock:
            self._aborted = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
