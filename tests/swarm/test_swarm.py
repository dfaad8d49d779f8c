"""deploy/swarm/stack.yml end to end, across two engines: an upload through WordPress' REST API on content
and every web task, ``docker service scale web=4``, a rolling update of the sidecar in the middle of a
1,000-file burst, a rolling update of the web nodes. The tests run in file order on one stack."""

from __future__ import annotations

import time
import urllib.parse

import pytest

from tests.stack.harness import _JPEG_PHP, fetch, media_files, sha256, wait_for
from tests.swarm.swarmlib import APP_UPLOADS, TIMINGS, Burst, SwarmStack, Task

pytestmark = pytest.mark.swarm

# Every file a web task serves, by its path under /wp-content/uploads/, fetched from its own nginx.
_SERVED = r"""
import hashlib, sys, urllib.error, urllib.request
for rel in sys.argv[1:]:
    try:
        body = urllib.request.urlopen("http://127.0.0.1/wp-content/uploads/" + rel, timeout=5).read()
        print(rel, hashlib.sha256(body).hexdigest())
    except (urllib.error.URLError, OSError) as exc:
        print(rel, "error", str(exc).replace(" ", "_"))
"""


def served(stack: SwarmStack, task: Task, files: dict[str, str]) -> list[str]:
    """Files a web task does not serve with the expected bytes (empty: it serves them all)."""
    quoted = {urllib.parse.quote(rel): rel for rel in files}
    out = stack.exec(task, "python3", "-c", _SERVED, *quoted, check=False).stdout.decode()
    got = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return [rel for q, rel in quoted.items() if got.get(q) != files[rel]]


def wait_served_everywhere(stack: SwarmStack, files: dict[str, str], timeout: float) -> float:
    def check() -> bool:
        if any(
            fetch(stack.front, rel).status != 200 or sha256(fetch(stack.front, rel).body) != d
            for rel, d in files.items()
        ):
            return False
        return not any(served(stack, task, files) for task in stack.tasks("web"))

    try:
        return wait_for(check, timeout, "the upload on content and every web task", interval=0.2)[1]
    except TimeoutError as exc:
        detail = {t.id[:6]: served(stack, t, files)[:3] for t in stack.tasks("web")}
        raise AssertionError(f"{exc}; missing on web tasks: {detail}\n{stack.logs()}") from None


def test_placement_secrets_and_least_privilege(swarm_stack: SwarmStack) -> None:
    stack = swarm_stack
    app, sidecar, content, fanout = (stack.one(s) for s in ("app", "sidecar", "content", "fanout"))
    # The sidecar shares the app's uploads volume, so it runs where the app runs; fanout with content.
    assert sidecar.node_id == app.node_id and fanout.node_id == content.node_id
    if len(stack.engines) == 2:
        # Both hops cross hosts: sidecar -> content, fanout -> the web task on the other engine.
        assert content.node_id != app.node_id
        assert {t.node_id for t in stack.tasks("web")} == set(stack.engines)
    # Keys arrive as secrets owned by the consuming uid, private keys 0400.
    for task, uid, key in ((sidecar, 33, "upsync_key"), (fanout, 10001, "upsync_key"), (content, 0, "host_key")):
        line = stack.exec(task, "stat", "-L", "-c", "%a %u %g", f"/run/secrets/{key}").stdout.decode().split()
        assert line == ["400", str(uid), str(uid)], (task.service, line)
    # The upsync services: their uid, no capability, read-only root.
    for task, uid in ((sidecar, 33), (fanout, 10001)):
        status = stack.exec(task, "sh", "-c", "cat /proc/1/status").stdout.decode()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split()[0] == str(uid) and fields["CapEff"].strip() == "0" * 16, (task.service, fields)
        assert stack.exec(task, "touch", "/probe", check=False).returncode != 0
        assert stack.exec(task, "touch", "/srv/uploads/probe", check=False).returncode != 0


def test_upload_through_wordpress_reaches_content_and_every_web_task(swarm_stack: SwarmStack) -> None:
    stack = swarm_stack
    assert stack.wp is not None
    app = stack.one("app")
    jpeg = stack.exec(app, "php", "-r", _JPEG_PHP, "--", "1600", "1200", "1").stdout
    doc, answered = stack.wp.upload("across-hosts.jpg", jpeg)
    rels = media_files(doc)
    sums = stack.exec(app, "sha256sum", *(f"{APP_UPLOADS}/{rel}" for rel in rels)).stdout.decode()
    files = {
        path.removeprefix(APP_UPLOADS + "/"): digest for digest, path in (line.split() for line in sums.splitlines())
    }
    assert sorted(files) == rels and len(files) >= 5
    took = wait_served_everywhere(stack, files, timeout=30)
    TIMINGS.append((f"upload answered -> {len(files)} files on content and {len(stack.tasks('web'))} web tasks", took))
    assert time.monotonic() - answered < 30


def test_scaled_web_tasks_get_the_full_copy(swarm_stack: SwarmStack) -> None:
    stack = swarm_stack
    start = time.monotonic()
    stack.docker("service", "scale", "--detach=false", f"{stack.service('web')}=4", timeout=300)
    stack.wait_healthy({"web": 4}, timeout=120)
    scaled = time.monotonic() - start
    # Every web task holds the app's whole tree: the new ones were found (tasks.web) and fully synced.
    took = stack.wait_copies("", timeout=90, web=4)
    TIMINGS.append(("docker service scale web=4 -> healthy", scaled))
    TIMINGS.append(("... -> the new tasks hold the full copy", took))
    if len(stack.engines) == 2:
        assert {t.node_id for t in stack.tasks("web")} == set(stack.engines)


def test_rolling_update_of_the_sidecar_mid_burst_loses_nothing(swarm_stack: SwarmStack) -> None:
    stack = swarm_stack
    before = stack.one("sidecar")
    burst = Burst(stack, "burst", count=1000, pause_ms=15)
    burst.start()
    try:
        at, _ = wait_for(lambda: (n := burst.written()) >= 300 and n, 120, "300 files of the burst", interval=0.2)
        start = time.monotonic()
        stack.docker("service", "update", "--force", "--detach=false", stack.service("sidecar"), timeout=300)
        updated = time.monotonic() - start
        during = burst.written()
    finally:
        burst.join(timeout=300)
    assert not burst.is_alive() and burst.error is None, burst.error
    after = stack.one("sidecar")
    assert after.id != before.id
    # The update really happened in the middle of the burst.
    assert at < 1000 and during > at, (at, during)
    took = stack.wait_copies("burst", timeout=120, web=len(stack.tasks("web")))
    TIMINGS.append((f"sidecar update --force (started at file {at}, done at {during})", updated))
    TIMINGS.append(("... burst over -> all 1,000 files on content and every web task", took))


def test_rolling_update_of_the_web_nodes_loses_nothing(swarm_stack: SwarmStack) -> None:
    stack = swarm_stack
    web = len(stack.tasks("web"))
    old = {t.id for t in stack.tasks("web")}
    start = time.monotonic()
    stack.docker("service", "update", "--force", "--detach=false", stack.service("web"), timeout=600)
    updated = time.monotonic() - start
    stack.wait_healthy({"web": web}, timeout=120)
    assert not old & {t.id for t in stack.tasks("web")}, "some web task was not replaced"
    # Every replaced task starts empty; the fanout fills each one.
    took = stack.wait_copies("", timeout=90, web=web)
    TIMINGS.append((f"web update --force ({web} tasks, one at a time)", updated))
    TIMINGS.append(("... -> every new task holds the full copy", took))
