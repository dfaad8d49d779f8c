"""SIGTERM / SIGHUP taken by a thread other than the main one.

A signal sent to a process (``kill``, ``docker stop``) is pending for the whole process; the kernel
lets whichever thread reaches it first take it: the main thread, a worker, the HTTP server's
per-request thread, watchfiles' Rust thread. Python runs the handler only in the main thread, and
only once that thread wakes up. The daemon's main thread sleeps in ``Event.wait(3600)``; if another
thread took the signal nothing wakes it, so the signal is acted on up to an hour later (``docker
stop`` then SIGKILLs it after 10 s: nothing flushed).

While writing this suite, ``kill(pid, SIGHUP)`` with ``/metrics`` polled every 20 ms (a thread per
request in the daemon) was not acted on in 4 of 12 tries; a thread other than the main one had taken
it (strace). The tests below make that certain with ``tgkill`` to one non-main thread: the state the
kernel leaves when it lets that thread take a process-directed signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.sshd import SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]

_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def blocks(pid: int, tid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as fh:
        mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigBlk:"))
    return bool(mask & (1 << (sig - 1)))


def other_thread(pid: int, sig: int) -> int | None:
    """The oldest thread of ``pid`` besides the main one that could take ``sig``; None if all block it.

    A thread blocking the signal never takes a process-directed one (blocking it in every other
    thread is one way to fix this), so the test then sends it to the process as ``kill`` does.
    """
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    return next((t for t in tids if not blocks(pid, t, sig)), None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_taken_by_another_thread_is_acted_on(
    source: Path, sshd: SshServer, start_synced, sig: signal.Signals, record
) -> None:
    sidecar = start_synced()
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    (source / "last-words.txt").write_text("to be flushed")
    wait_until(lambda: (sshd.root / "last-words.txt").exists(), 10, "the file replicated")
    (sshd.root / "stray.txt").write_text("only a full sync removes this")
    sent = time.monotonic()
    thread = other_thread(pid, sig)
    if thread is None:
        os.kill(pid, sig)
    else:
        tgkill(pid, thread, sig)
    acted = False
    try:
        if sig == signal.SIGTERM:
            wait_until(lambda: sidecar.proc.poll() is not None, 5, "the daemon to stop")  # type: ignore[union-attr]
            acted = sidecar.proc.returncode == 0
        else:
            wait_until(lambda: not (sshd.root / "stray.txt").exists(), 5, "the SIGHUP full sync")
            acted = True
    finally:
        record(signal=sig.name, thread=thread, acted_on=acted, waited_s=round(time.monotonic() - sent, 1))
    assert acted
