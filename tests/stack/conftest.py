"""The compose stack, up once for this module under a unique project name, torn down with its volumes.

Skipped only with ``UPSYNC_SKIP_STACK=1``; without Docker the tests fail and say so (CI has Docker).
A failing test gets the logs of the services it names with ``@pytest.mark.involves(...)``.
A module that sets ``COMPOSE_PROFILES = "monitoring"`` gets the stack with that profile (Prometheus).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.sshd import free_port
from tests.stack.harness import SERVICES, TIMINGS, CommandError, Compose, Stack, git_revision

# Cold: five images built from Debian packages (about 2 minutes here); warm: seconds.
BUILD_AND_UP_TIMEOUT = 600
WAIT_TIMEOUT = 180

_current: Stack | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "involves(*services): compose services whose logs a failure shows")


def _require_docker() -> None:
    hint = "the stack test needs Docker Engine and the Compose v2 plugin (set UPSYNC_SKIP_STACK=1 to skip it)"
    if shutil.which("docker") is None:
        pytest.fail(f"docker is not installed: {hint}", pytrace=False)
    for args in (["docker", "info", "--format", "{{.ServerVersion}}"], ["docker", "compose", "version"]):
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(args)}` did not answer within 30 s: {hint}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` failed ({proc.stderr.strip()[:300]}): {hint}", pytrace=False)


def _say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    global _current
    if os.environ.get("UPSYNC_SKIP_STACK") == "1":
        pytest.skip("UPSYNC_SKIP_STACK=1")
    _require_docker()
    project = f"upsync-test-{secrets.token_hex(4)}"
    port = free_port()
    admin_password = secrets.token_urlsafe(12)
    # Hermetic: none of the developer's UPSYNC_* settings leak in, but the image tag (UPSYNC_TAG,
    # default "local"): parallel checkouts build and test their own images side by side.
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSYNC_") or k == "UPSYNC_TAG"}
    env.update(
        COMPOSE_BAKE="false",
        UPSYNC_HTTP_PORT=str(port),
        UPSYNC_SITE_URL=f"http://127.0.0.1:{port}",
        UPSYNC_ADMIN_PASSWORD=admin_password,
        UPSYNC_DB_PASSWORD=secrets.token_urlsafe(12),
        UPSYNC_PROMETHEUS_PORT=str(free_port()),
        # The images' OCI label and upsync_build_info{revision}; one value for every module, so no rebuild.
        UPSYNC_REVISION=git_revision(),
        COMPOSE_PROFILES=getattr(request.module, "COMPOSE_PROFILES", ""),
    )
    compose = Compose(project, env)
    start = time.monotonic()
    try:
        compose("up", "-d", "--build", "--wait", "--wait-timeout", str(WAIT_TIMEOUT), timeout=BUILD_AND_UP_TIMEOUT)
    except CommandError as exc:
        logs = compose.logs(SERVICES, tail=60)
        _down(compose)
        pytest.fail(f"the stack did not come up:\n{exc}\n--- logs ---\n{logs}", pytrace=False)
    TIMINGS.append(("docker compose up --build --wait", time.monotonic() - start))
    _say(f"project {project} up in {time.monotonic() - start:.1f} s (build included), front http://127.0.0.1:{port}")
    stack = Stack(compose, port, admin_password)
    _current = stack
    try:
        stack.wait_front()
        assert stack.wp.installed(), "WordPress could not be installed"
        stack.wp.make_app_password()
        yield stack
    finally:
        _current = None
        _down(compose)


def _down(compose: Compose) -> None:
    start = time.monotonic()
    proc = compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
    if proc.returncode != 0:
        _say(f"down failed: {(proc.stdout + proc.stderr).decode(errors='replace')[-2000:]}")
    else:
        _say(f"project {compose.project} removed with its volumes in {time.monotonic() - start:.1f} s")
    _prune_old_images()


def _prune_old_images() -> None:
    """Remove the images earlier test runs built and this run's build untagged.

    Compose labels each image it builds with the project name, so every run (a new project) re-tags
    upsync/*:local with a new id; the previous ids are left dangling. The tagged images stay: they
    are the build cache of the next run.
    """
    listed = subprocess.run(
        ["docker", "images", "-q", "--no-trunc", "-f", "dangling=true", "-f", "label=com.docker.compose.project"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    ours = []
    for image in listed:
        project = subprocess.run(
            ["docker", "image", "inspect", "-f", '{{index .Config.Labels "com.docker.compose.project"}}', image],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout.strip()
        if project.startswith("upsync-test-"):
            ours.append(image)
    if ours:
        # Still in use (another run's containers): docker refuses, and that is fine.
        subprocess.run(["docker", "rmi", *ours], capture_output=True, timeout=120, check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach `compose ps` and the logs of the services the test involves."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed or _current is None:
        return
    marker = item.get_closest_marker("involves")
    services = tuple(marker.args) if marker else SERVICES
    compose = _current.compose
    try:
        ps = compose("ps", "-a", check=False).stdout.decode(errors="replace")
        logs = compose.logs(services, tail=120)
    except CommandError as exc:
        ps, logs = "", f"(no logs: {exc})"
    report.sections.append((f"compose ps / logs ({', '.join(services)})", ps + "\n" + logs))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("stack timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.2f} s  {what}")
