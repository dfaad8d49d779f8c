"""Targets as docs/targets.md prepares them: doc blocks, images, containers, and the replication checks.

Every wait has a deadline; every request goes to a container of a network (or compose project) the
tests made. The sidecar is this checkout's, on the host (``tests.helpers.Sidecar``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import Sidecar
from tests.sshd import KeyPair
from tests.stack.harness import CommandError, fetch, run, sha256, wait_for

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "targets.md"
COMPOSE_FILE = REPO / "compose" / "docker-compose.yml"
PLAIN_NGINX = Path(__file__).resolve().parent / "plain-nginx.Dockerfile"
TAG = os.environ.get("UPSYNC_TAG") or "local"
# The image the compose stack builds for content and web (docker compose build content).
NODE_IMAGE = f"upsync/node:{TAG}"

# Generous: two cores shared with the rest of the suite (and, on the project's machine, other work).
READY_TIMEOUT = 30
SERVED_TIMEOUT = 15
BUILD_TIMEOUT = 900


# ----- docs/targets.md ------------------------------------------------------------------------------


def doc_block(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` in docs/targets.md."""
    text = DOC.read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)\n```\n", text, re.DOTALL)
    if not found:
        raise AssertionError(f"docs/targets.md has no fenced block after <!-- {marker} -->")
    return found.group(1) + "\n"


def doc_text() -> str:
    return DOC.read_text()


def shell_command(block: str, starts: str) -> str:
    """The one command of a shell block that starts with ``starts``, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = [line.strip() for line in joined.splitlines() if line.strip().startswith(starts)]
    if len(commands) != 1:
        raise AssertionError(f"expected one `{starts}` command in the block, found {commands}")
    return commands[0]


# ----- images -----------------------------------------------------------------------------------------


def image_id(tag: str) -> str:
    proc = run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], check=False, timeout=60)
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""


def _drop_previous(tag: str, old: str) -> None:
    """A rebuild moved the tag: remove the image it left behind (in use elsewhere: docker refuses)."""
    if old and old != image_id(tag):
        run(["docker", "rmi", old], check=False, timeout=120)


def build(tag: str, dockerfile: str, context: Path | None = None, build_args: Sequence[str] = ()) -> str:
    """``docker build`` from Dockerfile text (no context unless given); returns the tag."""
    old = image_id(tag)
    args = ["docker", "build", "-q", "-t", tag, *(a for arg in build_args for a in ("--build-arg", arg))]
    if context is None:
        run([*args, "-"], stdin=dockerfile.encode(), timeout=BUILD_TIMEOUT)
    else:
        (context / "Dockerfile").write_text(dockerfile)
        run([*args, str(context)], timeout=BUILD_TIMEOUT)
    _drop_previous(tag, old)
    return tag


def build_node_image() -> str:
    """The node image exactly as the compose stack builds it (same builder, same cache)."""
    old = image_id(NODE_IMAGE)
    env = {**os.environ, "COMPOSE_BAKE": "false", "UPSYNC_TAG": TAG}
    # A build only (no containers, networks or volumes), under a fixed name: compose labels the image
    # with it, so an unchanged build keeps its image id from run to run.
    project = "upsync-test-targets-build"
    run(
        ["docker", "compose", "-p", project, "-f", str(COMPOSE_FILE), "build", "content"],
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    _drop_previous(NODE_IMAGE, old)
    return NODE_IMAGE


# ----- containers -------------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"upsync-targets-{prefix}-{secrets.token_hex(4)}"


@dataclass
class Container:
    """A container some test started; removed (with its anonymous volumes) by :meth:`remove`."""

    name: str
    network: str | None = None
    volumes: list[str] = field(default_factory=list)

    def inspect(self) -> dict:
        return json.loads(run(["docker", "inspect", self.name]).stdout)[0]

    @property
    def ip(self) -> str:
        nets = self.inspect()["NetworkSettings"]["Networks"]
        net = nets[self.network] if self.network else next(iter(nets.values()))
        return str(net["IPAddress"])

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        proc = run(["docker", "logs", self.name], check=False, timeout=60)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    def exec(self, *cmd: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(["docker", "exec", *(["-u", user] if user else []), self.name, *cmd], check=check, timeout=60)

    def wait_listening(self, *ports: int, timeout: float = READY_TIMEOUT) -> None:
        """Every port accepts a connection (the container still running), or fail with its log."""

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-3000:]}")
            ip = self.ip
            for port in ports:
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex((ip, port)) != 0:
                        return False
            return True

        try:
            wait_for(ready, timeout, f"{self.name} listening on {ports}", interval=0.1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()[-3000:]}") from None

    def remove(self) -> None:
        run(["docker", "rm", "-f", "-v", self.name], check=False, timeout=120)
        for volume in self.volumes:
            run(["docker", "volume", "rm", "-f", volume], check=False, timeout=60)


def docker_run(args: Sequence[str], *, network: str, volumes: Sequence[str] = ()) -> Container:
    """``docker run -d`` with ``args`` (options, image, command) on ``network``; the container's name
    must be among the options (``--name``)."""
    name = args[list(args).index("--name") + 1]
    container = Container(name, network, list(volumes))
    try:
        run(["docker", "run", "-d", "--network", network, *args], timeout=120)
    except CommandError:
        container.remove()
        raise
    return container


@contextlib.contextmanager
def started(container_factory: Callable[[], Container]) -> Iterator[Container]:
    """A started container, removed however the block ends; its log is printed (pytest shows it on failure)."""
    container = container_factory()
    try:
        yield container
    finally:
        print(f"--- {container.name} log ---\n{container.logs()[-6000:]}")
        container.remove()


def documented_run(command: str, *, name: str, keys_dir: Path, replace: dict[str, str]) -> list[str]:
    """The options of a documented ``docker run -d`` line, for :func:`docker_run`: the container's name
    made unique, host ports left out (the test reaches the container's address), ``$PWD`` the
    directory the documented keys block ran in, and each ``replace`` key (an image, a volume name)
    replaced in every word."""
    words = shlex.split(command)
    assert words[:3] == ["docker", "run", "-d"], words
    out: list[str] = []
    words = words[3:]
    i = 0
    while i < len(words):
        if words[i] == "-p":
            i += 2
            continue
        if words[i] == "--name":
            out += ["--name", name]
            i += 2
            continue
        word = words[i].replace("$PWD", str(keys_dir))
        for old, new in replace.items():
            word = word.replace(old, new)
        out.append(word)
        i += 1
    return out


# ----- known_hosts and the sidecar -------------------------------------------------------------------


def known_hosts_line(host: str, port: int, public_key: str) -> str:
    """As docs/targets.md writes it: ``host key`` on port 22, ``[host]:port key`` otherwise."""
    key = " ".join(public_key.split()[:2])
    return f"{host} {key}" if port == 22 else f"[{host}]:{port} {key}"


def logged_known_hosts_line(node: Container, host: str) -> str:
    """The known_hosts line the node image logs at start, for ``host``."""
    found = re.search(r"the sidecar's known_hosts line: (.+)$", node.logs(), re.MULTILINE)
    assert found, f"the node did not log its known_hosts line:\n{node.logs()[-2000:]}"
    return found.group(1).replace("HOST", host, 1)


@contextlib.contextmanager
def sidecar_to(
    source: Path, workdir: Path, client: KeyPair, target: str, known_hosts: str, *, watch: bool = True
) -> Iterator[Sidecar]:
    """The real sidecar replicating ``source`` to ``target`` (an ssh:// URL), pinning ``known_hosts``
    (one line); in watch mode, started and ready (its first full sync done)."""
    known = workdir / f"known_hosts-{secrets.token_hex(3)}"
    known.write_text(known_hosts + "\n")
    sidecar = Sidecar(source, target, client, workdir, SYNC_SSH_KNOWN_HOSTS_FILE=str(known))
    try:
        if watch:
            sidecar.start()
            sidecar.wait_ready(timeout=READY_TIMEOUT)
        yield sidecar
    finally:
        sidecar.kill()
        print(f"--- sidecar log ---\n{sidecar.logs()[-6000:]}")


def run_block(block: str, cwd: Path) -> None:
    """A documented shell block, as bash runs it with errexit (each command must work)."""
    proc = subprocess.run(
        ["bash", "-Eeuo", "pipefail", "-c", block], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"the documented block failed (exit {proc.returncode}):\n{block}\n{proc.stdout}{proc.stderr}"
        )


def make_source(workdir: Path) -> Path:
    source = workdir / "source"
    source.mkdir(parents=True)
    source.chmod(0o755)
    (source / "seed.txt").write_text("seed\n")  # an empty source is refused by the delete guard
    return source


# ----- what a user sees ---------------------------------------------------------------------------------

# rel -> bytes served, or None for "not there" (HTTP 404, or no such file on the node's disk).
Reader = Callable[[str], bytes | None]


def http_reader(base: str) -> Reader:
    """Files as nginx serves them at /wp-content/uploads/ on ``base`` (``http://ip:port``)."""

    def read(rel: str) -> bytes | None:
        response = fetch(base, rel)
        if response.status == 404:
            return None
        if response.status != 200:
            raise AssertionError(f"{base} answered {response.status} for {rel}: {response.body[:200]!r}")
        return response.body

    return read


def disk_reader(container: Container, directory: str) -> Reader:
    """Files on the node's own disk (sshd-only nodes serve nothing)."""

    def read(rel: str) -> bytes | None:
        proc = container.exec("cat", f"{directory}/{rel}", check=False)
        return proc.stdout if proc.returncode == 0 else None

    return read


def wait_content(read: Reader, rel: str, expected: bytes | None, what: str, timeout: float = SERVED_TIMEOUT) -> float:
    """Wait until ``rel`` reads as ``expected`` (None: gone); returns the seconds it took."""

    def matches() -> bool:
        return read(rel) == expected

    try:
        return wait_for(matches, timeout, what, interval=0.05)[1]
    except TimeoutError:
        got = read(rel)
        shown = "nothing (404)" if got is None else f"{len(got)} bytes, sha256 {sha256(got)[:12]}"
        raise AssertionError(f"{what}: after {timeout} s {rel} reads as {shown}") from None


def write(source: Path, rel: str, size: int = 65536) -> bytes:
    data = os.urandom(size)
    path = source / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def replicate_create_modify_delete(source: Path, read: Reader, *, deletes: bool = True) -> None:
    """The whole cycle a user expects: created -> served, modified -> served new, deleted file and
    deleted directory -> gone."""
    data = write(source, "2026/12/photo.jpg")
    wait_content(read, "2026/12/photo.jpg", data, "a created file")
    data = write(source, "2026/12/photo.jpg", size=70001)
    wait_content(read, "2026/12/photo.jpg", data, "a modified file")
    if not deletes:
        return
    (source / "2026/12/photo.jpg").unlink()
    wait_content(read, "2026/12/photo.jpg", None, "a deleted file")
    album = {rel: write(source, rel, size=4096) for rel in ("album/a.jpg", "album/sub/b.jpg")}
    for rel, data in album.items():
        wait_content(read, rel, data, "a created directory's files")
    shutil.rmtree(source / "album")
    for rel in album:
        wait_content(read, rel, None, "a deleted directory's files")
