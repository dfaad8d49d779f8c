"""Fixtures of the fault suite: every scenario records what it measured (printed, and as JSON lines)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.faultlib import wait_synced
from tests.helpers import Sidecar


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(key=value, ...)``: one summary line on stdout (``-s`` or on failure) and, when
    ``UPSYNC_FAULT_RESULTS`` names a file, one JSON line appended to it (the figures quoted in docs/faults.md).
    """

    def write(**figures: object) -> None:
        xfail = request.node.get_closest_marker("xfail") is not None
        print(f"[fault] {request.node.name}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
        path = os.environ.get("UPSYNC_FAULT_RESULTS")
        if path:
            doc = {
                "scenario": request.node.name,
                "known_bug": xfail,
                **figures,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, default=str) + "\n")

    return write


@pytest.fixture
def runtime_dir(workdir: Path) -> Path:
    """``SYNC_RUNTIME_DIR`` for the daemons of a scenario: inside ``workdir``, so it goes with it. (The
    ``sidecars`` fixture SIGKILLs daemons, which then leave their runtime directory behind.)"""
    path = workdir / "runtime"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def start_synced(run_sidecar: Callable[..., Sidecar], runtime_dir: Path) -> Callable[..., Sidecar]:
    """``run_sidecar``, returning only once every target had its first full sync (see ``wait_synced``)."""

    def start(*targets: object, **env: str) -> Sidecar:
        env.setdefault("SYNC_RUNTIME_DIR", str(runtime_dir))
        sidecar = run_sidecar(*targets, ready=False, **env)
        wait_synced(sidecar)
        return sidecar

    return start
