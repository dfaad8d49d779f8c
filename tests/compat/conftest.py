"""The compatibility matrix: every test here runs once per target rsync version (``VERSIONS``).

One container per version per module (module-scoped, parametrized: pytest groups the tests by version),
a fresh target directory per test. Needs Docker (CI has it) and root; skipped with ``UPSYNC_SKIP_COMPAT=1``.

Known incompatibilities are marked where the test is defined, with ``@known_failure(<rsync version>,
reason=...)``; it becomes ``xfail(strict=True)`` for that version only, so a fix shows as an XPASS that
fails the run until the mark is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.targets import VERSIONS, TargetContainer, TargetVersion, build_image
from tests.sshd import KeyPair

_built: dict[str, float] = {}
TIMINGS: list[tuple[str, float]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "known_failure(rsync, reason): strict xfail against targets running that rsync version"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        version = callspec.params.get("target") if callspec is not None else None
        if not isinstance(version, TargetVersion):  # (this hook sees every test of the session)
            continue
        for mark in item.iter_markers("known_failure"):
            if mark.args[0] == version.rsync:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


def _require_docker() -> None:
    hint = "the compatibility matrix needs Docker (set UPSYNC_SKIP_COMPAT=1 to skip it)"
    if shutil.which("docker") is None:
        pytest.fail(f"docker is not installed: {hint}", pytrace=False)
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        pytest.fail(f"`docker info` failed ({proc.stderr.strip()[:300]}): {hint}", pytrace=False)


@pytest.fixture(scope="module", params=VERSIONS, ids=[v.id for v in VERSIONS])
def target(request: pytest.FixtureRequest, host_key: KeyPair, client_key: KeyPair) -> Iterator[TargetContainer]:
    """A running target of one version (its image built once per session)."""
    if os.environ.get("UPSYNC_SKIP_COMPAT") == "1":
        pytest.skip("UPSYNC_SKIP_COMPAT=1")
    if os.geteuid() != 0:
        pytest.skip("needs root (target directories owned by the container's account)")
    version: TargetVersion = request.param
    _require_docker()
    if version.id not in _built:
        try:
            _built[version.id] = build_image(version)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        TIMINGS.append((f"build {version.image}", _built[version.id]))
    start = time.monotonic()
    container = TargetContainer(version, host_key, client_key)
    try:
        container.start()
        reported = container.rsync_version()
        # The matrix must test what it says it tests.
        assert reported.split()[:3] == ["rsync", "version", version.rsync], reported
        TIMINGS.append((f"start {version.id} ({reported})", time.monotonic() - start))
        print(f"[compat] {container.name} at {container.address}: {reported}", file=sys.stderr)
        yield container
    finally:
        container.stop()


@pytest.fixture
def dst(target: TargetContainer, request: pytest.FixtureRequest) -> Path:
    """This test's own, empty target directory (the account's key now writes there, and only there)."""
    return target.fresh_target(request.node.originalname)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("compat timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.2f} s  {what}")
