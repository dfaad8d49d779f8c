"""Debian 12's own rsync (3.2.7, bookworm *main*) with its rrsync, unpacked beside the project for tests.

The machine's rsync is 3.5.0 (bookworm-security). A target running 3.2.7 rejects ``--delete-missing-args``
entries below an existing directory; tests that need such a receiver on the host (no Docker) get one here:
``apt-get download rsync/bookworm`` and ``dpkg -x`` into ``.cache/`` (root, Debian's archive reachable), with
its rrsync pointed at its own rsync. The compatibility matrix (``tests/compat/``) runs real target images.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["old_rrsync"]

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "rsync-bookworm"


def old_rrsync() -> Path:
    """An ``rrsync`` that runs Debian 12's rsync 3.2.7. Raises RuntimeError if it cannot be had."""
    script = CACHE / "rrsync"
    if script.exists():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    got = subprocess.run(
        ["apt-get", "download", "rsync/bookworm"], cwd=work, capture_output=True, text=True, timeout=120, check=False
    )
    debs = list(work.glob("rsync_*.deb"))
    if got.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download rsync/bookworm failed: {got.stderr.strip()[-300:]}")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(work / "root")], check=True, timeout=60)
    rsync = work / "root/usr/bin/rsync"
    version = subprocess.run([str(rsync), "--version"], capture_output=True, text=True, check=True).stdout
    if not re.search(r"version 3\.2\.", version):
        raise RuntimeError(f"bookworm main's rsync is not 3.2.x: {version.splitlines()[0]}")
    text = (work / "root/usr/bin/rrsync").read_text()
    text = text.replace("RSYNC = '/usr/bin/rsync'", f"RSYNC = '{rsync}'")
    tmp = CACHE / "rrsync.tmp"
    tmp.write_text(text)
    tmp.chmod(0o755)
    # The target account runs it: every directory on the way must be traversable.
    for path in (REPO / ".cache", CACHE, work, work / "root", work / "root/usr", work / "root/usr/bin"):
        path.chmod(0o755)
    tmp.rename(script)
    return script
