"""Drive a Docker Swarm from the outside: engines (this one, and a second one in a container), the stack
of ``deploy/swarm/stack.yml``, its tasks wherever they run, and the files each node holds.

Every wait has a deadline. Everything this module creates carries a unique name, and the fixtures
(tests/swarm/conftest.py) remove it however the test ends.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.stack.harness import CommandError, WordPress, run, wait_for

REPO = Path(__file__).resolve().parents[2]
STACK_FILE = REPO / "deploy" / "swarm" / "stack.yml"
WORKER_DIR = Path(__file__).resolve().parent / "worker"
APP_UPLOADS = "/var/lib/wordpress/wp-content/uploads"
NODE_UPLOADS = "/srv/uploads"
# The same command in every container (app, content, web): one line naming the tree's content.
# Dotfiles (rsync's temporaries) are not part of the copy.
TREE_DIGEST = (
    "cd {dir} 2>/dev/null || exit 0; "
    "find . -type f ! -name '.*' -print0 | sort -z | xargs -0 -r sha256sum | sha256sum | cut -c1-16; "
    "find . -type f ! -name '.*' | wc -l"
)

# (what, seconds): printed in pytest's terminal summary, quoted in docs/swarm.md.
TIMINGS: list[tuple[str, float]] = []


def say(message: str) -> None:
    print(f"[swarm] {message}", flush=True)


def timed(what: str) -> Callable[[], float]:
    """``done = timed("x"); ...; done()`` records how long x took and returns it."""
    start = time.monotonic()

    def done() -> float:
        took = time.monotonic() - start
        TIMINGS.append((what, took))
        say(f"{what}: {took:.1f} s")
        return took

    return done


# ----- images for an engine with vfs ---------------------------------------------------------------


def _duration(ns: int) -> str:
    return f"{ns // 1_000_000}ms"


def _quote_env(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def import_changes(config: Mapping[str, Any]) -> list[str]:
    """Dockerfile instructions (``docker import --change``) that give an imported root file system an
    image's run-time configuration: environment, entrypoint, command, user, working directory, volumes,
    ports and health check.

    Example:
        >>> import_changes({"Env": ["A=1"], "Entrypoint": ["tini", "--"], "User": "10001:10001"})
        ['ENV A="1"', 'ENTRYPOINT ["tini", "--"]', 'USER 10001:10001']
    """
    out = [f"ENV {name}={_quote_env(value)}" for name, _, value in (e.partition("=") for e in config.get("Env") or [])]
    if config.get("Entrypoint"):
        out.append(f"ENTRYPOINT {json.dumps(config['Entrypoint'])}")
    if config.get("Cmd"):
        out.append(f"CMD {json.dumps(config['Cmd'])}")
    if config.get("User"):
        out.append(f"USER {config['User']}")
    if config.get("WorkingDir"):
        out.append(f"WORKDIR {config['WorkingDir']}")
    for volume in sorted(config.get("Volumes") or {}):
        out.append(f"VOLUME {json.dumps([volume])}")
    for port in sorted(config.get("ExposedPorts") or {}):
        out.append(f"EXPOSE {port}")
    check = config.get("Healthcheck") or {}
    test = check.get("Test") or []
    if test[:1] == ["NONE"]:
        out.append("HEALTHCHECK NONE")
    elif test[:1] in (["CMD"], ["CMD-SHELL"]):
        flags = [
            f"--{flag}={_duration(check[key])}"
            for key, flag in (("Interval", "interval"), ("Timeout", "timeout"), ("StartPeriod", "start-period"))
            if check.get(key)
        ]
        if check.get("Retries"):
            flags.append(f"--retries={check['Retries']}")
        cmd = json.dumps(test[1:]) if test[0] == "CMD" else test[1]
        out.append(f"HEALTHCHECK {' '.join(flags)} CMD {cmd}".replace("  ", " "))
    return out


# ----- engines -------------------------------------------------------------------------------------


@dataclass
class Engine:
    """A Docker engine: this one (``prefix=()``), or one inside a container (``docker exec C``)."""

    name: str
    prefix: tuple[str, ...] = ()
    node_id: str = ""

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        interactive = ("-i",) if stdin is not None and self.prefix else ()
        prefix = (*self.prefix[:2], *interactive, *self.prefix[2:]) if self.prefix else ()
        return run([*prefix, "docker", *args], timeout=timeout, check=check, stdin=stdin)

    def text(self, *args: str, timeout: float = 120) -> str:
        return self.docker(*args, timeout=timeout).stdout.decode().strip()


class Worker(Engine):
    """A second Docker engine in a container of this one (Debian's docker.io, vfs storage), as the
    shared notes on this machine say it starts: no --privileged (the host lacks CAP_SYS_RESOURCE)."""

    def __init__(self, name: str, image: str) -> None:
        super().__init__(name, ("docker", "exec", name))
        self.image = image
        self.address = ""

    def start(self) -> None:
        run(
            [
                "docker", "run", "-d", "--name", self.name, "--hostname", self.name,
                "--label", "upsync.test=swarm-worker",
                "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
                # docker exec into a task of another uid: runc opens /proc/PID/ns/* of that uid.
                "--cap-add", "SYS_PTRACE",
                "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                "--security-opt", "systempaths=unconfined",
                "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run",
                self.image,
            ],
            timeout=60,
        )  # fmt: skip
        wait_for(lambda: self.docker("info", check=False, timeout=10).returncode == 0, 60, "the second engine")
        self.address = (
            run(["docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", self.name], timeout=30)
            .stdout.decode()
            .strip()
        )

    def load(self, image: str) -> None:
        """Copy an image in, flattened to one layer: vfs copies every layer in full, so one layer loads
        fastest; and ``docker export`` gives the root directory the mode the image shows (0755), where the
        local base image's own layer has 0700, which vfs would apply and lock every non-root user out."""
        config = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config}}", image]).stdout)
        container = run(["docker", "create", image]).stdout.decode().strip()
        try:
            changes = [arg for change in import_changes(config) for arg in ("--change", change)]
            export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
            try:
                proc = subprocess.run(
                    ["docker", "exec", "-i", self.name, "docker", "import", *changes, "-", image],
                    stdin=export.stdout,
                    capture_output=True,
                    timeout=600,
                    check=False,
                )
            finally:
                if export.stdout:
                    export.stdout.close()
                export.wait(timeout=60)
            if proc.returncode != 0 or export.returncode != 0:
                raise CommandError(f"loading {image} into {self.name} failed: {proc.stderr.decode()[-2000:]}")
        finally:
            run(["docker", "rm", "-f", container], check=False)

    def remove(self) -> None:
        # Inner containers first (their cgroups live in the host's hierarchy), then the engine and its
        # anonymous /var/lib/docker volume.
        self.docker("swarm", "leave", "--force", check=False, timeout=60)
        ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.decode().split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
        run(["docker", "rm", "-f", "-v", self.name], check=False, timeout=120)


# ----- the stack ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    id: str
    service: str
    node_id: str
    container: str


@dataclass
class SwarmStack:
    """One deployment of ``deploy/swarm/stack.yml`` under a unique name."""

    name: str
    env: dict[str, str]
    engines: dict[str, Engine] = field(default_factory=dict)  # node id -> engine
    front: str = ""  # http://address:port of content's published port
    wp: WordPress | None = None

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(["docker", *args], timeout=timeout, env=self.env, check=check)

    def service(self, name: str) -> str:
        return f"{self.name}_{name}"

    def deploy(self) -> None:
        self.docker("stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), self.name, timeout=180)

    def tasks(self, service: str) -> list[Task]:
        """The service's tasks that should run and do (state running), wherever they are."""
        ids = self.docker(
            "service", "ps", "-q", "--no-trunc", "-f", "desired-state=running", self.service(service)
        ).stdout.decode()
        tasks = []
        for tid in ids.split():
            info = json.loads(self.docker("inspect", tid).stdout)[0]
            status = info["Status"]
            if status["State"] != "running":
                continue
            container = (status.get("ContainerStatus") or {}).get("ContainerID", "")
            tasks.append(Task(tid, service, info["NodeID"], container))
        return tasks

    def one(self, service: str) -> Task:
        tasks = self.tasks(service)
        if len(tasks) != 1:
            raise CommandError(f"expected one running {service} task, found {len(tasks)}")
        return tasks[0]

    def exec(
        self, task: Task, *cmd: str, user: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """A command in a task's container, on whichever engine runs it."""
        engine = self.engines[task.node_id]
        return engine.docker(
            "exec", *(["-u", user] if user else []), task.container, *cmd, timeout=timeout, check=check
        )

    def inspect(self, task: Task) -> dict[str, Any]:
        return json.loads(self.engines[task.node_id].docker("inspect", task.container).stdout)[0]

    def healthy(self, service: str, replicas: int) -> bool:
        tasks = self.tasks(service)
        if len(tasks) != replicas:
            return False
        states = [self.inspect(t)["State"].get("Health", {}).get("Status", "none") for t in tasks]
        return all(s in ("healthy", "none") for s in states)

    def wait_healthy(self, replicas: Mapping[str, int], timeout: float) -> None:
        def check() -> bool:
            return all(self.healthy(service, n) for service, n in replicas.items())

        try:
            wait_for(check, timeout, "every service healthy", interval=1)
        except TimeoutError as exc:
            ps = self.docker("stack", "ps", "--no-trunc", self.name, check=False).stdout.decode()
            raise AssertionError(f"{exc}\n{ps}\n{self.logs()}") from None

    def tree(self, task: Task, directory: str) -> tuple[str, int]:
        """(digest, file count) of a directory in a task's container."""
        out = self.exec(task, "sh", "-c", TREE_DIGEST.format(dir=shlex.quote(directory))).stdout.decode().split()
        return (out[0], int(out[1])) if len(out) == 2 else ("", 0)

    def node_trees(self, rel: str) -> dict[str, tuple[str, int]]:
        """The tree ``rel`` (under the uploads) on content and on every web task, by task."""
        nodes = [self.one("content"), *self.tasks("web")]
        return {f"{t.service}@{t.id[:6]}": self.tree(t, f"{NODE_UPLOADS}/{rel}") for t in nodes}

    def wait_copies(self, rel: str, timeout: float, web: int) -> float:
        """Until content and every one of ``web`` web tasks hold exactly the app's tree ``rel``."""
        expected = self.tree(self.one("app"), f"{APP_UPLOADS}/{rel}")
        assert expected[1] > 0, f"the app has no files in {rel}"
        last: dict[str, tuple[str, int]] = {}

        def converged() -> bool:
            nonlocal last
            last = self.node_trees(rel)
            return len(last) == 1 + web and all(v == expected for v in last.values())

        try:
            return wait_for(converged, timeout, f"{rel} on content and {web} web tasks", interval=0.5)[1]
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; app {expected}, nodes {last}\n{self.logs()}") from None

    def logs(self, services: Sequence[str] = ("sidecar", "content", "fanout", "web"), tail: int = 30) -> str:
        out = []
        for service in services:
            proc = self.docker(
                "service", "logs", "--raw", "--tail", str(tail), self.service(service), check=False, timeout=30
            )
            out.append(f"--- {service} ---\n" + (proc.stdout + proc.stderr).decode(errors="replace"))
        return "\n".join(out)

    def remove(self) -> None:
        """The stack, then (once its containers are gone on every engine) its volumes and networks."""
        self.docker("stack", "rm", self.name, check=False, timeout=120)
        label = f"label=com.docker.stack.namespace={self.name}"

        def gone() -> bool:
            for engine in self.engines.values():
                if engine.docker("ps", "-aq", "-f", label, check=False, timeout=30).stdout.strip():
                    return False
            return not self.docker("network", "ls", "-q", "-f", label, check=False).stdout.strip()

        try:
            wait_for(gone, 300, f"the containers and networks of {self.name} to go", interval=1)
        except TimeoutError as exc:
            say(f"{exc}")
        for engine in self.engines.values():
            volumes = engine.docker("volume", "ls", "-q", "-f", label, check=False, timeout=30).stdout.decode().split()
            if volumes:
                engine.docker("volume", "rm", *volumes, check=False, timeout=60)


class Burst(threading.Thread):
    """``count`` files written into the app's uploads as WordPress would (www-data), ``pause_ms`` apart."""

    def __init__(self, stack: SwarmStack, rel: str, count: int, pause_ms: int) -> None:
        super().__init__(name="burst", daemon=True)
        self.stack, self.rel, self.count, self.pause_ms = stack, rel, count, pause_ms
        self.error: BaseException | None = None

    def run(self) -> None:
        php = (
            "$d = $argv[1]; @mkdir($d, 0755, true);"
            "for ($i = 0; $i < (int) $argv[2]; $i++) {"
            "  file_put_contents(sprintf('%s/f%04d.bin', $d, $i), random_bytes(2048 + $i));"
            "  usleep((int) $argv[3] * 1000);"
            "}"
        )
        try:
            self.stack.exec(
                self.stack.one("app"),
                "php", "-r", php, "--", f"{APP_UPLOADS}/{self.rel}", str(self.count), str(self.pause_ms),
                user="www-data",
                timeout=300,
            )  # fmt: skip
        except BaseException as exc:
            self.error = exc

    def written(self) -> int:
        return self.stack.tree(self.stack.one("app"), f"{APP_UPLOADS}/{self.rel}")[1]
