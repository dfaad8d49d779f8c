"""Read a running rsync's output as it streams: its progress (``--info=progress2``) and its itemized changes
(``--out-format='%i %n'``), for long full syncs (a 50 to 200 GB library seeded once).

rsync ends a progress line with ``\\r`` and an itemized line with ``\\n``; :meth:`sidecar.rsync.Rsync.run`
hands over one line at a time. rsync's own percentage is useless here: it is the bytes *sent* over all bytes
in the tree, so a full sync that finds most files already on the target ends at 2 %. The totals come from
the dry run every deleting full sync makes first (:meth:`sidecar.transport.Transport.count_full`): the files
and bytes that this run will send. ETA: the bytes left at the average rate since the run started.

Names in rsync's output are escaped: with ``LC_ALL=C`` every byte that is not printable ASCII (a newline, a
UTF-8 letter) is written ``\\#ooo`` (octal), and a backslash before ``#`` as ``\\#134``; :func:`unescape`
reverses that exactly, so a hook gets the name as it is on disk.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import logs
from .metrics import Metrics

__all__ = [
    "FullSyncOutput",
    "FullSyncProgress",
    "Progress2",
    "human_bytes",
    "matched_bytes",
    "parse_item",
    "parse_progress2",
]

log = logs.get("progress")

# Gauges are set at most this often (a full sync of 200,000 small files prints 200,000 progress lines).
GAUGE_EVERY_S = 0.5

_PROGRESS2 = re.compile(
    rb"^\s*([\d,.]+)\s+(\d+)%\s+\S+\s+\d+:\d\d:\d\d(?:\s+\(xfr#(\d+), (ir|to)-chk=(\d+)/(\d+)\))?\s*$"
)
_ESCAPE = re.compile(rb"\\#([0-7]{3})")
# An --out-format='%i %n' line: the 11-character change string, a space, the name.
_ITEMIZED = re.compile(rb"^(?:[<>ch.][fdLDS][.+?a-zA-Z]{9}|\*deleting  ) .")


@dataclass(frozen=True)
class Progress2:
    """One ``--info=progress2`` line.

    Attributes:
        bytes: bytes of the files transferred so far (the one in flight included).
        files: files transferred so far (``xfr#``; None on a line printed mid-file).
        to_check, total: entries left to check and entries known (``to-chk``/``ir-chk``); None mid-file.
        final: the file list is complete (``to-chk``; ``ir-chk`` while rsync still scans).
    """

    bytes: int
    files: int | None = None
    to_check: int | None = None
    total: int | None = None
    final: bool = False


def parse_progress2(line: bytes) -> Progress2 | None:
    """Parse a progress line (None when it is not one).

    Example:
        >>> parse_progress2(b"    105,560,000  81%   10.21MB/s    0:00:09 (xfr#3779, to-chk=1222/5022)")
        Progress2(bytes=105560000, files=3779, to_check=1222, total=5022, final=True)
        >>> parse_progress2(b"      2,981,888   5%    2.71MB/s    0:00:16  ")
        Progress2(bytes=2981888, files=None, to_check=None, total=None, final=False)
        >>> parse_progress2(b"<f+++++++++ 5%.jpg") is None
        True
    """
    m = _PROGRESS2.match(line)
    if not m:
        return None
    done = int(m.group(1).replace(b",", b"").replace(b".", b""))
    if m.group(3) is None:
        return Progress2(done)
    return Progress2(done, int(m.group(3)), int(m.group(5)), int(m.group(6)), m.group(4) == b"to")


def unescape(name: bytes) -> str:
    r"""A name from rsync's output as it is on disk (``\#ooo`` escapes reversed; not UTF-8: surrogates).

    Example:
        >>> unescape(rb"new\#012line caf\#303\#251 back\#134#012.jpg")
        'new\nline café back\\#012.jpg'
    """
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), name)
    return raw.decode("utf-8", "surrogateescape")


def parse_item(line: bytes) -> tuple[str, str] | None:
    """``("sent", path)`` for a regular file rsync transferred, ``("deleted", path)`` for an entry it deleted
    (a directory with a trailing ``/``), from an ``--out-format='%i %n'`` line; None for anything else
    (directories made, attributes changed, symlinks, progress, stats).

    Example:
        >>> parse_item(b"<f+++++++++ 2026/05/a b.jpg"), parse_item(b"*deleting   old/")
        (('sent', '2026/05/a b.jpg'), ('deleted', 'old/'))
        >>> parse_item(b"cd+++++++++ 2026/") is None
        True
    """
    if len(line) < 13 or line[11:12] != b" ":
        return None
    if line.startswith(b"*deleting"):
        return "deleted", unescape(line[12:])
    if line[0:1] in (b"<", b">") and line[1:2] == b"f":
        return "sent", unescape(line[12:])
    return None


_MATCHED = re.compile(r"^Matched data: ([\d,.]+) bytes", re.M)


def matched_bytes(stats: str) -> int:
    """Bytes the receiver already had (``Matched data`` of ``--stats``): with SYNC_RESUME, the partial files it
    resumed from (and unchanged blocks of files changed in place).

    Example:
        >>> matched_bytes("Literal data: 1,000 bytes\\nMatched data: 12,383,312 bytes\\n")
        12383312
    """
    m = _MATCHED.search(stats)
    return int(m.group(1).replace(",", "").replace(".", "")) if m else 0


def human_bytes(n: float) -> str:
    """Example:
    >>> human_bytes(999), human_bytes(2_147_483_648), human_bytes(45_100_000)
    ('999 B', '2.1 GB', '45.1 MB')
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class FullSyncProgress:
    """The progress of one full sync to one target: fed from rsync's lines, read by ``/readyz``, the gauges
    and a log line every ``interval_s``.

    Args:
        target: the target's name.
        to_send: (files, bytes) the run will send, from its dry run; None when there was none (no deletes).
        interval_s: seconds between log lines (0: none).
        metrics: where the gauges are (None: no gauges).
        clock: monotonic time (tests).
    """

    def __init__(
        self,
        target: str,
        to_send: tuple[int, int] | None,
        interval_s: int,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.to_send = to_send
        self.interval_s = interval_s
        self.metrics = metrics
        self.clock = clock
        self.started = clock()
        self.files = 0
        self.bytes = 0
        self.checked: tuple[int, int, bool] | None = None  # (checked, known, list complete)
        self.lines = 0  # progress lines logged
        self._lock = threading.Lock()
        self._last_log = self.started
        self._last_gauge = float("-inf")
        if metrics is not None:
            metrics.full_running.labels(target).set(1)
            self._gauges(force=True)

    def update(self, p: Progress2) -> None:
        with self._lock:
            self.bytes = max(self.bytes, p.bytes)
            if p.files is not None:
                self.files = max(self.files, p.files)
            if p.total is not None and p.to_check is not None:
                self.checked = (p.total - p.to_check, p.total, p.final)
        now = self.clock()
        self._gauges(now)
        if self.interval_s and now - self._last_log >= self.interval_s:
            self._last_log = now
            self.log()

    def snapshot(self) -> dict[str, Any]:
        """The progress as numbers (``/readyz``). ``percent`` and ``eta_s`` are None while unknown."""
        with self._lock:
            files, done, checked = self.files, self.bytes, self.checked
        elapsed = max(0.0, self.clock() - self.started)
        rate = done / elapsed if elapsed > 0 else 0.0
        doc: dict[str, Any] = {
            "files_sent": files,
            "bytes_sent": done,
            "elapsed_s": round(elapsed, 1),
            "rate_bytes_s": round(rate),
            "percent": None,
            "eta_s": None,
        }
        if self.to_send is not None:
            # What rsync sends can exceed the dry run's count (files written since): never past 100 %.
            total_files, total_bytes = max(self.to_send[0], files), max(self.to_send[1], done)
            doc.update(files_to_send=total_files, bytes_to_send=total_bytes)
            if total_bytes:
                doc["percent"] = round(100 * done / total_bytes, 1)
                if rate > 0:
                    doc["eta_s"] = round((total_bytes - done) / rate)
            elif total_files:
                doc["percent"] = round(100 * files / total_files, 1)  # only empty files to send
            else:
                doc["percent"], doc["eta_s"] = 100.0, 0
        if checked is not None:
            doc["checked"], doc["known"], doc["list_complete"] = checked
        return doc

    def log(self) -> None:
        """One progress line (also called at the end by whoever wants a last word)."""
        doc = self.snapshot()
        fields: dict[str, Any] = {"target": self.target}
        if doc["percent"] is not None:
            fields["done"] = f"{doc['percent']:.1f}%"
        if "files_to_send" in doc:
            fields["files"] = f"{doc['files_sent']}/{doc['files_to_send']}"
            fields["size"] = f"{human_bytes(doc['bytes_sent'])}/{human_bytes(doc['bytes_to_send'])}"
        else:
            fields["files"] = doc["files_sent"]
            fields["size"] = human_bytes(doc["bytes_sent"])
            if "checked" in doc:
                fields["checked"] = f"{doc['checked']}/{doc['known']}{'' if doc['list_complete'] else '+'}"
        fields["rate"] = f"{human_bytes(doc['rate_bytes_s'])}/s"
        if doc["eta_s"] is not None:
            fields["eta"] = _clock(doc["eta_s"])
        fields["elapsed"] = _clock(doc["elapsed_s"])
        self.lines += 1
        log.info("full sync progress", extra={"fields": fields})

    def _gauges(self, now: float | None = None, force: bool = False) -> None:
        m = self.metrics
        if m is None:
            return
        now = self.clock() if now is None else now
        if not force and now - self._last_gauge < GAUGE_EVERY_S:
            return
        self._last_gauge = now
        doc = self.snapshot()
        t = self.target
        nan = float("nan")
        m.full_files.labels(t).set(doc["files_sent"])
        m.full_bytes.labels(t).set(doc["bytes_sent"])
        m.full_files_total.labels(t).set(doc.get("files_to_send", nan))
        m.full_bytes_total.labels(t).set(doc.get("bytes_to_send", nan))
        m.full_eta.labels(t).set(nan if doc["eta_s"] is None else doc["eta_s"])

    def finish(self) -> None:
        """The run ended (well or not): final gauges, ``running`` back to 0."""
        self._gauges(force=True)
        if self.metrics is not None:
            self.metrics.full_running.labels(self.target).set(0)
            self.metrics.full_eta.labels(self.target).set(0)


class FullSyncOutput:
    """The line handler of a full sync's rsync run (see :meth:`sidecar.rsync.Rsync.run`).

    Args:
        progress: fed with every progress line.
        on_item: called with ``("sent" | "deleted", path)`` for every itemized change (None: ignored).
    """

    def __init__(self, progress: FullSyncProgress, on_item: Callable[[str, str], None] | None = None) -> None:
        self.progress = progress
        self.on_item = on_item

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it was consumed (not kept for the stats parser)."""
        p = parse_progress2(line)
        if p is not None:
            self.progress.update(p)
            return True
        item = parse_item(line)
        if item is not None and self.on_item is not None:
            self.on_item(*item)
        # Every itemized line (directories made, attributes changed too) is consumed: only the stats stay.
        return item is not None or _ITEMIZED.match(line) is not None
