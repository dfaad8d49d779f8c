"""rsync targets as distributions ship them: one Docker image per rsync version, one container per module.

Each image (``tests/compat/image/Dockerfile``) is a Debian base with ``openssh-server``, ``python3`` and
one pinned version of that release's ``rsync`` (whose package ships ``/usr/bin/rrsync``). The test
mounts three things into the container: the host key, a directory holding ``authorized_keys`` (forcing
``rrsync -wo /srv/targets/<dir>`` with the image's own rrsync) and a host directory as ``/srv/targets``,
so the test reads the target's files straight from the host. The daemon runs on the host and reaches the
container by its address on a Docker network the fixture makes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.sshd import KeyPair, wait_until

__all__ = ["VERSIONS", "TargetContainer", "TargetVersion", "build_image", "docker"]

HERE = Path(__file__).resolve().parent
UID = 10001  # the image's "upsync" account; it owns the target directories
USER = "upsync"
BUILD_TIMEOUT = 600  # a cold build downloads Debian packages (about 25 s each here; a trixie base 60 s)


@dataclass(frozen=True)
class TargetVersion:
    """One target image.

    Attributes:
        id: the pytest id and image name part (``<rsync version>-<where it comes from>``).
        rsync: the upstream rsync version; the container must report exactly this.
        suite: the Debian release the image is built from.
        apt: the apt package spec: an upstream version glob, so a Debian rebuild of the same upstream
            version still builds, while another upstream version fails the build instead of quietly
            changing what the matrix tests.
    """

    id: str
    rsync: str
    suite: str
    apt: str

    @property
    def base(self) -> str:
        return f"debian:{self.suite}-slim"

    @property
    def image(self) -> str:
        # Parallel checkouts on one engine each build their own (UPSYNC_TAG, as the compose stack does).
        return f"upsync/compat-{self.id}:{os.environ.get('UPSYNC_TAG') or 'local'}"


VERSIONS = (
    # Debian 12's own rsync (bookworm main); Ubuntu 22.04/24.04 and RHEL 9 also ship 3.2.x.
    TargetVersion("3.2.7-bookworm", "3.2.7", "bookworm", "rsync=3.2.7-*"),
    # bookworm-security: what the project's own images use.
    TargetVersion("3.5.0-bookworm-security", "3.5.0", "bookworm", "rsync=3.5.0+*"),
    # Debian 13 (trixie main): the same upstream version, built on trixie, behind OpenSSH 10.
    TargetVersion("3.5.0-trixie", "3.5.0", "trixie", "rsync=3.5.0+*"),
)


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a docker command (bounded); on failure raise with its output."""
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"docker {' '.join(args)}: no result after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def build_image(version: TargetVersion) -> float:
    """Build the version's image (and, for a release other than bookworm, its local base image).

    Returns the seconds it took (about 1 s when Docker's cache has every layer).
    """
    start = time.monotonic()
    if docker("image", "inspect", version.base, check=False).returncode != 0:
        if version.suite == "bookworm":
            raise RuntimeError("debian:bookworm-slim is missing: run ../shared/docker-env.sh first (CI does)")
        proc = subprocess.run(
            ["bash", str(HERE / "base-image.sh"), version.suite],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"could not build {version.base}:\n{proc.stderr[-3000:]}")
    before = docker("image", "inspect", "-f", "{{.Id}}", version.image, check=False).stdout.strip()
    # The classic builder: this engine's CLI has no buildx, which BuildKit would need.
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    args = [
        "docker",
        "build",
        "-q",
        "--build-arg",
        f"BASE={version.base}",
        "--build-arg",
        f"SUITE={version.suite}",
        "--build-arg",
        f"RSYNC={version.apt}",
        "-t",
        version.image,
        str(HERE / "image"),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not build {version.image}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    if before and before != proc.stdout.strip():
        # The Dockerfile changed: the previous build lost its tag. Remove it (refused if still in use).
        docker("rmi", before, check=False)
    return time.monotonic() - start


class TargetContainer:
    """One running target of ``version``, on a Docker network of its own.

    Args:
        version: which image.
        host_key: the sshd's host key (its private half is mounted read-only).
        client: the key ``authorized_keys`` lets in.
    """

    def __init__(self, version: TargetVersion, host_key: KeyPair, client: KeyPair) -> None:
        self.version = version
        self.host_key = host_key
        self.client = client
        suffix = secrets.token_hex(4)
        self.name = f"upsync-compat-{version.id}-{suffix}"
        self.network = f"upsync-compat-{suffix}"
        self.base = Path(tempfile.mkdtemp(prefix=f"upsync-compat-{version.id}-"))
        self.base.chmod(0o755)
        self.keys_dir = self.base / "authorized_keys"  # root-owned, 0755: sshd's StrictModes stays on
        self.keys_dir.mkdir(mode=0o755)
        self.targets = self.base / "targets"
        self.targets.mkdir(mode=0o755)
        self.address = ""
        self._count = 0

    def start(self) -> TargetContainer:
        docker("network", "create", "--label", "upsync.test=compat", self.network)
        self.authorize("unused")
        docker(
            "run",
            "-d",
            "--name",
            self.name,
            "--label",
            "upsync.test=compat",
            "--network",
            self.network,
            "-v",
            f"{self.host_key.private}:/etc/ssh/keys/host:ro",
            "-v",
            f"{self.keys_dir}:/etc/ssh/authorized_keys:ro",
            "-v",
            f"{self.targets}:/srv/targets",
            self.version.image,
        )
        fmt = f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}'
        self.address = docker("inspect", "-f", fmt, self.name).stdout.strip()
        wait_until(self._banner, 20, f"sshd in {self.name} at {self.address}:22", interval=0.05)
        return self

    def _banner(self) -> bool:
        state = docker("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip()
        if state != "true":
            raise RuntimeError(f"{self.name} stopped: {self.logs()}")
        try:
            with socket.create_connection((self.address, 22), timeout=1) as conn:
                return conn.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def logs(self) -> str:
        proc = docker("logs", "--tail", "50", self.name, check=False)
        return proc.stdout + proc.stderr

    def stop(self) -> None:
        """Remove the container and its network; the target files go with the temporary directory."""
        docker("rm", "-f", "-v", self.name, check=False)
        docker("network", "rm", self.network, check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def authorize(self, directory: str) -> None:
        """Point the key's forced command at ``/srv/targets/<directory>``: ``rrsync -wo`` jails it there."""
        line = f'command="/usr/bin/rrsync -wo /srv/targets/{directory}",restrict {self.client.public_text}\n'
        tmp = self.keys_dir / f".{USER}.tmp"
        tmp.write_text(line)
        tmp.chmod(0o644)
        tmp.replace(self.keys_dir / USER)

    def fresh_target(self, label: str = "t") -> Path:
        """A new, empty target directory, owned by the account; the key now writes there (and only there)."""
        self._count += 1
        name = f"{self._count:03d}-{label}"[:60]
        path = self.targets / name
        path.mkdir(mode=0o755)
        os.chown(path, UID, UID)
        self.authorize(name)
        return path

    @property
    def url(self) -> str:
        """``SYNC_TARGETS`` for the current target directory (``/`` is the rrsync jail's root)."""
        return f"ssh://{USER}@{self.address}/"

    def known_hosts_line(self) -> str:
        kind, key = self.host_key.public_text.split()[:2]
        return f"{self.address} {kind} {key}"  # port 22: no brackets

    def rsync_version(self) -> str:
        """The first line of ``rsync --version`` inside the container."""
        return docker("exec", self.name, "rsync", "--version").stdout.splitlines()[0]
