"""/readyz at start-up: 200 must mean "the first full sync reached every target".

``Daemon.run()`` starts the HTTP server, then the watcher, waits until the watch is in place, and only
then creates the workers. ``ready()`` takes "no worker yet" as "every worker ready" (``all([])``), a
state meant for a ``dns+ssh://`` name resolving to nothing; with fixed targets /readyz answers 200 in
that window, before anything was synced. Found by test_fault_restart.py (a restarted daemon "ready"
after 0.1 s); then measured: 7 of 30 starts with the CPU busy (4 busy loops on 2 cores, not part of
this suite) answered 200 with ``"targets": []``. The test below puts the daemon in that window
deterministically: the same objects, in the order ``run()`` creates them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config import load
from sidecar.daemon import Daemon
from sidecar.watcher import Watcher
from tests.sshd import KeyPair, SshServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"),
]


def test_not_ready_before_the_workers_exist(source: Path, sshd: SshServer, client_key: KeyPair, record) -> None:
    cfg, _ = load(
        environ={
            "SYNC_SOURCE": str(source),
            "SYNC_TARGETS": sshd.url,
            "SYNC_SSH_KEY_FILE": str(client_key.private),
            "SYNC_SSH_KNOWN_HOSTS_FILE": str(sshd.known_hosts),
            "SYNC_ENV_FILE": "",
            "SYNC_HTTP_ADDR": "",
        }
    )
    daemon = Daemon(cfg)
    watcher = Watcher(
        daemon.root,
        quiet_ms=cfg.quiet_ms,
        max_delay_ms=cfg.max_delay_ms,
        backend=cfg.watch_backend,
        poll_interval_ms=cfg.poll_interval_ms,
        on_batch=lambda changes, seen_at: None,
        on_lost=lambda reason: None,
        on_fatal=lambda message: None,
    )
    daemon.watcher = watcher
    watcher.start()
    try:
        assert watcher.started.wait(10)
        ok, doc = daemon.ready()  # what /readyz answers right now
        record(ready=ok, targets=len(doc["targets"]), note=doc.get("note", ""))
        assert not ok, doc
    finally:
        watcher.stop()
        watcher.join(5)
        daemon.runtime.close()
