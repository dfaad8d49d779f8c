"""The Swarm stack (deploy/swarm/stack.yml) on a swarm of two engines: this one (manager: db, app, sidecar,
web) and a second one in a container (worker: content, fanout, web), up once for the module.

* ``docker swarm init`` only if this engine is in no swarm, and ``docker swarm leave --force`` afterwards
  only then; the node labels the test adds are removed again.
* The second engine: tests/swarm/worker (Debian's docker.io, vfs), joined as a worker; the images reach it
  flattened (``docker export | docker import``, see ``Worker.load``). ``UPSYNC_SWARM_ENGINES=1`` runs
  everything on this engine alone (faster; the hops then do not cross hosts).
* The keys: the sidecar image's ``keys`` command, and the ``docker secret create`` lines it prints, run as
  printed.

Everything is named ``upsync-swarm-<random>`` and removed however the test ends (stack, volumes, networks,
secrets, the second engine). Skipped only with ``UPSYNC_SKIP_SWARM=1``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import free_port
from tests.stack.harness import WordPress, request, run, wait_for
from tests.swarm.swarmlib import (
    REPO,
    TIMINGS,
    WORKER_DIR,
    Engine,
    SwarmStack,
    Worker,
    say,
    timed,
)

# Every service of the stack and how many tasks it runs at first.
REPLICAS = {"db": 1, "app": 1, "sidecar": 1, "content": 1, "fanout": 1, "web": 2}
IMAGES = ("sidecar", "node", "app", "db")


def _tag() -> str:
    return os.environ.get("UPSYNC_TAG", "local")


def _require_docker() -> None:
    hint = "the Swarm test needs Docker Engine and the Compose v2 plugin (set UPSYNC_SKIP_SWARM=1 to skip it)"
    if shutil.which("docker") is None:
        pytest.fail(f"docker is not installed: {hint}", pytrace=False)
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        pytest.fail(f"`docker info` failed ({proc.stderr.strip()[:300]}): {hint}", pytrace=False)


def _build_images(env: dict[str, str]) -> None:
    """The stack's images, built as the compose stack builds them (cached when tests/stack ran first)."""
    done = timed("images built (compose build; cached after tests/stack)")
    compose = ["docker", "compose", "-f", str(REPO / "compose" / "docker-compose.yml")]
    run([*compose, "build", "sidecar", "content", "app", "db"], env={**env, "COMPOSE_BAKE": "false"}, timeout=900)
    done()


def _swarm_state() -> tuple[str, bool]:
    state = run(["docker", "info", "-f", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"]).stdout.decode()
    local, control = state.split()
    return local, control == "true"


@pytest.fixture(scope="module")
def swarm_stack() -> Iterator[SwarmStack]:
    if os.environ.get("UPSYNC_SKIP_SWARM") == "1":
        pytest.skip("UPSYNC_SKIP_SWARM=1")
    _require_docker()
    engines = os.environ.get("UPSYNC_SWARM_ENGINES", "2")
    if engines not in ("1", "2"):
        pytest.fail(f'invalid UPSYNC_SWARM_ENGINES="{engines}": must be 1 or 2', pytrace=False)
    name = f"upsync-swarm-{secrets.token_hex(3)}"
    tag = _tag()
    # Hermetic: none of the developer's UPSYNC_* settings leak in, but the image tag.
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSYNC_")}
    env["UPSYNC_TAG"] = tag
    made_swarm = False
    gwbridge_existed = True
    labelled: list[tuple[str, str]] = []  # (node id, label) added by the test
    worker: Worker | None = None
    stack: SwarmStack | None = None
    keydir = Path(tempfile.mkdtemp(prefix=f"{name}-keys-"))
    try:
        _build_images(env)
        local, control = _swarm_state()
        networks = run(["docker", "network", "ls", "--format", "{{.Name}}"]).stdout.decode().split()
        gwbridge_existed = "docker_gwbridge" in networks
        if local == "inactive":
            done = timed("docker swarm init")
            run(["docker", "swarm", "init", "--advertise-addr", "172.17.0.1"], timeout=60)
            made_swarm = True
            done()
        elif local != "active" or not control:
            pytest.fail(f"this engine is a swarm {local} node without control: the test needs a manager", pytrace=False)
        manager = Engine("manager", node_id=run(["docker", "info", "-f", "{{.Swarm.NodeID}}"]).stdout.decode().strip())
        stack = SwarmStack(name, env, {manager.node_id: manager})
        labels = {manager.node_id: ["upsync.app", "upsync.web"]}
        front_host = "127.0.0.1"
        if engines == "2":
            done = timed("second engine: image built, started, joined")
            run(["docker", "build", "-q", "-t", f"upsync/swarm-worker:{tag}", str(WORKER_DIR)], timeout=600)
            worker = Worker(f"{name}-worker", f"upsync/swarm-worker:{tag}")
            worker.start()
            token = run(["docker", "swarm", "join-token", "-q", "worker"]).stdout.decode().strip()
            worker.docker("swarm", "join", "--token", token, "172.17.0.1:2377", timeout=60)
            worker.node_id = worker.text("info", "-f", "{{.Swarm.NodeID}}")
            stack.engines[worker.node_id] = worker
            labels[worker.node_id] = ["upsync.content", "upsync.web"]
            # Content publishes its port on its own node: the worker's address, from here.
            front_host = worker.address
            done()
            done = timed("images loaded into the second engine (sidecar + node, flattened)")
            for image in ("sidecar", "node"):
                worker.load(f"upsync/{image}:{tag}")
            done()
        else:
            labels[manager.node_id].append("upsync.content")
        for node, names in labels.items():
            for label in names:
                run(["docker", "node", "update", "--label-add", f"{label}=true", node], timeout=30)
                labelled.append((node, label))

        # The keys: the image's own command; its `docker secret create` lines run as printed (same
        # path inside and outside the container, so the printed paths are right here too).
        done = timed("keys made (python -m sidecar keys in the image) and loaded as secrets")
        keys = run(
            [
                "docker", "run", "--rm", "--network", "none", "--cap-drop", "ALL", "--read-only",
                "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{keydir}:{keydir}",
                f"upsync/sidecar:{tag}", "keys", str(keydir), "--name", name,
            ],
            timeout=60,
        ).stdout.decode()  # fmt: skip
        lines = [line for line in keys.splitlines() if line.startswith("docker secret ")]
        assert len(lines) == 8, keys
        for line in lines:
            run(["bash", "-c", line], timeout=30)
        done()

        port = free_port()
        admin_password = secrets.token_urlsafe(12)
        stack.front = f"http://{front_host}:{port}"
        env.update(
            UPSYNC_SECRETS=name,
            UPSYNC_HTTP_PORT=str(port),
            UPSYNC_SITE_URL=stack.front,
            UPSYNC_ADMIN_PASSWORD=admin_password,
            UPSYNC_DB_PASSWORD=secrets.token_urlsafe(12),
        )
        stack.env = env
        done = timed("docker stack deploy -> every service healthy")
        stack.deploy()
        stack.wait_healthy(REPLICAS, timeout=300)
        done()
        wait_for(
            lambda: request(stack.front + "/wp-json/", timeout=5).status == 200,
            120,
            "WordPress through content's published port",
            interval=0.5,
        )
        stack.wp = WordPress(stack.front, "admin", admin_password)
        assert stack.wp.installed(), "WordPress could not be installed"
        stack.wp.make_app_password()
        say(f"stack {name} up on {len(stack.engines)} engine(s); front {stack.front}")
        yield stack
    finally:
        done = timed("teardown (stack, volumes, secrets, second engine, swarm)")
        if stack is not None:
            stack.remove()
        ours = run(["docker", "secret", "ls", "-q", "-f", f"name={name}-"], check=False).stdout.decode().split()
        if ours:
            run(["docker", "secret", "rm", *ours], check=False)
        if worker is not None:
            worker.remove()
            if worker.node_id and not made_swarm:
                run(["docker", "node", "rm", "--force", worker.node_id], check=False, timeout=60)
        if made_swarm:
            run(["docker", "swarm", "leave", "--force"], check=False, timeout=60)
            # `swarm init` made this bridge; leaving keeps it.
            if not gwbridge_existed:
                run(["docker", "network", "rm", "docker_gwbridge"], check=False, timeout=60)
        else:
            for node, label in labelled:
                run(["docker", "node", "update", "--label-rm", label, node], check=False, timeout=30)
        shutil.rmtree(keydir, ignore_errors=True)
        done()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("swarm timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.2f} s  {what}")
