"""Fixtures of the target tests: Docker, one network for the session, the keys, the images.

Skipped only with ``UPSYNC_SKIP_TARGETS=1``; without Docker the tests fail and say so (CI has Docker).
Images stay as the build cache of the next run (a rebuild removes the one it replaced).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import KeyPair
from tests.targets import targetlib as t


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "targets: prepares targets as docs/targets.md says (needs Docker)")


def _require_docker() -> None:
    hint = "the target tests need Docker Engine and the Compose v2 plugin (set UPSYNC_SKIP_TARGETS=1 to skip them)"
    if shutil.which("docker") is None:
        pytest.fail(f"docker is not installed: {hint}", pytrace=False)
    for args in (["docker", "info", "--format", "{{.ServerVersion}}"], ["docker", "compose", "version"]):
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(args)}` did not answer within 30 s: {hint}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` failed ({proc.stderr.strip()[:300]}): {hint}", pytrace=False)


@pytest.fixture(scope="session")
def docker() -> None:
    if os.environ.get("UPSYNC_SKIP_TARGETS") == "1":
        pytest.skip("UPSYNC_SKIP_TARGETS=1")
    _require_docker()


@pytest.fixture(scope="session")
def network(docker: None) -> Iterator[str]:
    """A bridge network of the tests' own: the host reaches its containers by address."""
    name = t.unique("net")
    t.run(["docker", "network", "create", name], timeout=60)
    yield name
    t.run(["docker", "network", "rm", name], check=False, timeout=60)


@pytest.fixture(scope="session")
def target_keys() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="upsync-targets-keys-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def client(target_keys: Path) -> KeyPair:
    """The sidecar's key."""
    return KeyPair(target_keys, "upsync_ed25519")


@pytest.fixture(scope="session")
def node_image(docker: None) -> str:
    return t.build_node_image()
