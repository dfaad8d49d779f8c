"""The operations a worker (and ``check``, ``plan``) performs on one target: connect, send listed paths,
count and remove paths, count and run a full sync. Each is one or two rsync runs over the target's
persistent ssh connection; how each run ended is classified here and raised as :class:`TransferError`
when it failed. No decisions: the worker asks :mod:`sidecar.policy` what to do with the counts.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import logs
from .filters import delete_rules
from .plan import files_from
from .rsync import (
    MISSING_ARGS,
    PROBE_DIR,
    PROBE_NAME,
    RULES,
    Outcome,
    Result,
    Rsync,
    Stats,
    classify,
    deletions_skipped,
    in_the_way,
    parse_itemized,
    parse_stats,
    receiver_version,
    skipped_paths,
)
from .scan import Scan
from .ssh import SshError, SshLink
from .targets import Target

__all__ = ["Receiver", "Run", "TransferError", "Transport"]

log = logs.get("transport")

# rsync's exit code for a protocol incompatibility (errcode.h: RERR_PROTOCOL).
RSYNC_PROTOCOL_ERROR = 2
# How often, and how far apart, a run refused by rrsync's per-directory lock is tried again at once (another
# rsync is writing: `check` or `plan` next to the daemon, or a dying one of ours) before it counts as failed.
_BUSY_TRIES = 20
_BUSY_PAUSE_S = 0.25


class TransferError(Exception):
    """A run failed. ``fatal``: retrying cannot help (needs the operator); ``reason``: the metrics label."""

    def __init__(self, reason: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal


@dataclass(frozen=True)
class Receiver:
    """What the target's rsync takes, found out on each new connection.

    Attributes:
        method: how removals are sent (:data:`~sidecar.rsync.MISSING_ARGS` or :data:`~sidecar.rsync.RULES`).
        version: its version when it named it ('' otherwise: rsync does not announce it).
    """

    method: str
    version: str = ""

    def describe(self) -> str:
        v = f"rsync {self.version}" if self.version else "rsync (version not announced)"
        if self.method == MISSING_ARGS:
            return f"{v}; takes --delete-missing-args"
        return f"{v}; rejects --delete-missing-args (rsync 3.2.x): removals use --delete scoped by filter rules"


@dataclass(frozen=True)
class Run:
    """A run that ended well enough: its result, stats and outcome kind (ok, vanished, skipped, delete_limit)."""

    result: Result
    stats: Stats
    kind: str


class Transport:
    """Operations on one target.

    Args:
        target: where to.
        link: the persistent ssh connection.
        rsync: command lines and runs for this target.
        workdir: a private directory for the receiver probe.
        on_skipped: called with ``(relative path, why)`` of source paths rsync could not read.
    """

    def __init__(
        self,
        target: Target,
        link: SshLink,
        rsync: Rsync,
        workdir: Path,
        on_skipped: Callable[[list[tuple[str, str]]], None] = lambda _: None,
    ) -> None:
        self.target = target
        self.link = link
        self.rsync = rsync
        self.workdir = workdir
        self.on_skipped = on_skipped
        self.receiver: Receiver | None = None

    # ----- connection ------------------------------------------------------------------------------

    def connect(self) -> bool:
        """Make sure the connection is up (and the receiver known). True if a new connection was made."""
        try:
            new = self.link.ensure()
        except SshError as exc:
            raise TransferError(exc.reason, str(exc)) from None
        if new:
            log.info("connected", extra={"fields": {"target": self.target.name, "starts": self.link.starts}})
            self.receiver = None  # a new connection may reach a new (upgraded, replaced) target: ask again
        if self.receiver is None:
            self.receiver = self.probe()
            log.info("receiver", extra={"fields": {"target": self.target.name, "rsync": self.receiver.describe()}})
        return new

    def probe(self) -> Receiver:
        """Find out whether the receiver takes ``--delete-missing-args`` (a dry run: nothing changes)."""
        with tempfile.TemporaryDirectory(prefix="probe-", dir=self.workdir) as empty:
            os.mkdir(os.path.join(empty, PROBE_DIR))
            result = self._exec(self.rsync.probe_args(empty), os.fsencode(PROBE_NAME) + b"\0", sandboxed=False)
        outcome = classify(result.returncode, result.stderr)
        if outcome.kind in ("ok", "vanished"):
            return Receiver(MISSING_ARGS, receiver_version(result.stderr))
        if result.returncode == RSYNC_PROTOCOL_ERROR:
            # 3.2.x: "invalid file mode 00 ... protocol incompatibility" (under load, sometimes exit 2 with no
            # message at all). Filter rules work on every rsync, so any protocol error means: use them.
            return Receiver(RULES, receiver_version(result.stderr))
        self._raise(outcome)
        raise AssertionError("unreachable")

    # ----- batches -----------------------------------------------------------------------------------

    def send(self, files_from: bytes) -> Run:
        """Send the listed paths."""
        return self._run(self.rsync.send_args(), files_from)

    def _removal(self, delete: list[str], retract: list[str]) -> tuple[str, bytes]:
        assert self.receiver is not None
        if self.receiver.method == MISSING_ARGS and not retract:
            return MISSING_ARGS, files_from(delete)
        return RULES, delete_rules([*delete, *retract])

    def count_removals(self, delete: list[str], retract: list[str]) -> int:
        """How many paths removing these would delete on the target (everything below a directory too)."""
        self.connect()  # the receiver decides the method
        method, stdin = self._removal(delete, retract)
        return self._run(self.rsync.remove_args(method, count_only=True), stdin).stats.deleted

    def remove(self, delete: list[str], retract: list[str], max_delete: int) -> Run:
        """Remove these paths on the target; rsync stops at ``max_delete`` (the counted number)."""
        self.connect()  # the receiver decides the method
        method, stdin = self._removal(delete, retract)
        return self._run(self.rsync.remove_args(method, count_only=False, max_delete=max_delete), stdin)

    # ----- full syncs --------------------------------------------------------------------------------

    def count_full(self, scan: Scan, delete: bool) -> tuple[Stats, list[str]]:
        """What a full sync would do (a dry run): entries, creations and, with ``delete``, deletions; and the
        paths even a deleting run could not place (a directory in their way keeps an excluded path)."""
        run = self._run(self.rsync.full_args(delete, count_only=True), scan.rules())
        if delete and deletions_skipped(run.result.stderr):
            # A directory became unreadable after the scan: rsync counted no deletions. The next attempt's
            # scan keeps it out.
            raise TransferError("partial", "a directory became unreadable during the count; counting again")
        return run.stats, (in_the_way(run.result.stderr) if run.kind == "delete_limit" else [])

    def preview_full(self, scan: Scan) -> tuple[Stats, list[str], list[str]]:
        """A dry run of a full sync with deletes: its stats, the files it would send and the paths it would
        delete (``python -m sidecar plan``)."""
        run = self._run(self.rsync.full_args(True, count_only=True, itemize=True), scan.rules())
        if deletions_skipped(run.result.stderr):
            raise TransferError("partial", "a directory became unreadable during the dry run; run plan again")
        sent, deleted = parse_itemized(run.result.stdout)
        return run.stats, sent, deleted

    def full(self, scan: Scan, delete: bool, max_delete: int, on_output: Callable[[bytes], bool] | None = None) -> Run:
        """Send the whole tree (and delete up to ``max_delete`` paths). ``on_output``: rsync's progress and
        itemized lines as they come (see :class:`sidecar.progress.FullSyncOutput`)."""
        args = self.rsync.full_args(delete, count_only=False, max_delete=max_delete, progress=on_output is not None)
        return self._run(args, scan.rules(), on_output)

    # ----- running -----------------------------------------------------------------------------------

    def _exec(
        self,
        args: list[str],
        stdin: bytes,
        sandboxed: bool = True,
        on_output: Callable[[bytes], bool] | None = None,
    ) -> Result:
        for _ in range(_BUSY_TRIES):
            result = self.rsync.run(args, stdin, sandboxed=sandboxed, on_output=on_output)
            if "Another instance of rrsync" not in result.stderr:
                break
            # The lock is per target directory and held only for one transfer; `check` or `plan`
            # running next to the daemon is the usual holder.
            time.sleep(_BUSY_PAUSE_S)
        return result

    def _raise(self, outcome: Outcome) -> None:
        raise TransferError(outcome.reason, outcome.message, fatal=outcome.kind == "fatal")

    def _run(self, args: list[str], stdin: bytes, on_output: Callable[[bytes], bool] | None = None) -> Run:
        self.connect()
        result = self._exec(args, stdin, on_output=on_output)
        outcome = classify(result.returncode, result.stderr)
        if outcome.kind in ("retry", "fatal"):
            self._raise(outcome)
        if outcome.kind == "skipped":
            # Keyed like the planner's reports (relative path, reason), so each path is reported once.
            prefix = self.rsync.source
            self.on_skipped(
                [(p[len(prefix) :] if p.startswith(prefix) else p, why) for p, why in skipped_paths(result.stderr)]
            )
        return Run(result, parse_stats(result.stdout), outcome.kind)
