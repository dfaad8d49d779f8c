"""Shared fixtures: keys, a real sshd with an rrsync-jailed account, a source tree, the daemon."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Sidecar
from tests.sshd import KeyPair, SshServer


@pytest.fixture(scope="session")
def keydir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="upsync-keys-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def client_key(keydir: Path) -> KeyPair:
    return KeyPair(keydir, "client")


@pytest.fixture(scope="session")
def host_key(keydir: Path) -> KeyPair:
    return KeyPair(keydir, "host")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A world-traversable scratch directory (the target account must reach into it)."""
    path = Path(tempfile.mkdtemp(prefix="upsync-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def source(workdir: Path) -> Path:
    path = workdir / "source"
    path.mkdir()
    (path / "seed.txt").write_text("seed\n")  # an empty source is refused by the delete guard
    return path


@pytest.fixture
def sshd(workdir: Path, client_key: KeyPair, host_key: KeyPair) -> Iterator[SshServer]:
    server = SshServer(workdir / "sshd", client_key, host_key)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sidecars(workdir: Path) -> Iterator[list[Sidecar]]:
    """Started daemons are registered here and killed after the test, whatever happened."""
    started: list[Sidecar] = []
    yield started
    for sidecar in started:
        sidecar.kill()
        print(f"--- sidecar log ({sidecar.log.name}) ---\n{sidecar.logs()}")  # shown by pytest on failure


@pytest.fixture
def run_sidecar(source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar]):
    """Start the daemon against ``sshd`` and wait until it is ready; extra kwargs are SYNC_* settings."""

    def start(*targets: SshServer, ready: bool = True, **env: str) -> Sidecar:
        sidecar = Sidecar(source, list(targets) or [sshd], client_key, workdir, **env)
        sidecars.append(sidecar)
        sidecar.start()
        if ready:
            sidecar.wait_ready()
        return sidecar

    return start


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (dedicated ssh target user, sysctl knobs)")
    for item in items:
        if "needs_root" in item.keywords:
            item.add_marker(skip)
