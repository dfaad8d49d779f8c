"""The purge demo (compose/cdn.yml): a caching edge in front of content, purged by the sidecar's post-sync
hook. Only what it needs runs: keys, sidecar, content, edge (no WordPress); files are written into the
uploads volume as WordPress (uid 33) writes them, in place, as a media-replace plugin does.

What a user sees: the edge keeps serving a cached image for a day, whatever content has (the control,
rewritten on content behind upsync's back); an image rewritten in the uploads is served new by the edge
as soon as the hook's PURGE for it went out, a deleted one is 404 there, and a sync listing more than
SYNC_HOOK_MAX_PATHS purges everything.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.sshd import free_port
from tests.stack.harness import COMPOSE_FILE, REPO, TIMINGS, CommandError, Compose, request, run, wait_for

CDN_FILE = REPO / "compose" / "cdn.yml"
UP_TIMEOUT = 600
PREFIX = "/wp-content/uploads/"

# Run in the writer container as root: write (or delete) files in the uploads volume, owned by uid 33.
_WRITER = r"""
import json, os, sys
ops = json.load(sys.stdin)
for rel, text in ops:
    path = os.path.join("/u", rel)
    if text is None:
        os.unlink(path)
        continue
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as fh:  # in place (O_TRUNC), as media-replace plugins rewrite an image
        fh.write(text)
    for p in (parent, os.path.dirname(parent), "/u", path):
        os.chown(p, 33, 33)
"""


class CdnCompose(Compose):
    """The reference stack with compose/cdn.yml on top."""

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        files = ["-f", str(COMPOSE_FILE), "-f", str(CDN_FILE)]
        return run(["docker", "compose", "-p", self.project, *files, *args], timeout=timeout, env=self.env, check=check)


class Demo:
    def __init__(self, compose: CdnCompose, front: int, edge: int, tag: str) -> None:
        self.compose = compose
        self.content = f"http://127.0.0.1:{front}"
        self.edge = f"http://127.0.0.1:{edge}"
        self.writer = f"{compose.project}-writer"
        volume = f"{compose.project}_wp_uploads:/u"
        image = f"upsync/sidecar:{tag}"
        args = ["--rm", "--name", self.writer, "--network", "none", "--no-healthcheck", "-v", volume]
        args += ["--entrypoint", "sleep"]
        run(["docker", "run", "-d", *args, image, "infinity"])

    def write(self, *ops: tuple[str, str | None]) -> None:
        """Write (text) or delete (None) files in the uploads, in one go (one batch)."""
        args = ["docker", "exec", "-i", "-u", "0", self.writer, "python3", "-c", _WRITER]
        run(args, stdin=json.dumps(ops).encode())

    def get(self, base: str, rel: str) -> tuple[int, str, str]:
        resp = request(base + PREFIX + urllib.parse.quote(rel), timeout=5)
        return resp.status, resp.body.decode(errors="replace"), resp.headers.get("X-Cache-Status", "")

    def purges(self, rel: str) -> int:
        """PURGE requests for one file (or for everything, ``*``) in the edge's log."""
        logs = self.compose("logs", "--no-color", "edge").stdout.decode(errors="replace")
        path = PREFIX + ("*" if rel == "*" else urllib.parse.quote(rel))
        return len(re.findall(rf'"PURGE {re.escape(path)} HTTP', logs))

    def metric(self, name: str, **labels: str) -> float:
        # The container's own SYNC_HTTP_ADDR (an address on the monitoring network in the stack).
        code = (
            "import os, urllib.request as u; "
            "print(u.urlopen('http://' + os.environ['SYNC_HTTP_ADDR'] + '/metrics').read().decode())"
        )
        text = self.compose.exec(self.compose.one("sidecar"), "python", "-c", code).stdout.decode()
        total = 0.0
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def cached(self, rel: str, text: str) -> bool:
        """The edge answers with ``text`` from its cache."""
        status, body, cache = self.get(self.edge, rel)
        return status == 200 and body == text and cache == "HIT"


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    if os.environ.get("UPSYNC_SKIP_STACK") == "1":
        pytest.skip("UPSYNC_SKIP_STACK=1")
    project = f"upsync-test-cdn-{secrets.token_hex(4)}"
    front, edge = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSYNC_") or k == "UPSYNC_TAG"}
    env.update(COMPOSE_BAKE="false", UPSYNC_HTTP_PORT=str(front), UPSYNC_EDGE_PORT=str(edge), UPSYNC_HOOK_MAX_PATHS="3")
    compose = CdnCompose(project, env)
    start = time.monotonic()
    demo = None
    try:
        up = ("up", "-d", "--build", "--wait", "--wait-timeout", "180", "sidecar", "content", "edge")
        compose(*up, timeout=UP_TIMEOUT)
        TIMINGS.append(("cdn demo: compose up (keys, sidecar, content, edge)", time.monotonic() - start))
        demo = Demo(compose, front, edge, env.get("UPSYNC_TAG", "local"))
        yield demo
    except CommandError as exc:
        pytest.fail(f"the cdn demo did not come up:\n{exc}\n{compose.logs(('sidecar', 'content', 'edge'))}")
    finally:
        print(compose.logs(("sidecar", "edge"), tail=80))  # shown when a test failed
        if demo is not None:
            run(["docker", "rm", "-f", demo.writer], check=False)
        compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
        print(f"[stack] {project} removed", file=sys.stderr)


@pytest.mark.stack
def test_rewritten_image_is_served_new_by_the_edge_right_after_the_hook_ran(demo: Demo) -> None:
    photo, control = "2026/12/café ✓.jpg", "2026/12/control.jpg"
    demo.write((photo, "photo v1"), (control, "control v1"))
    # Both were synced, and the hook purged both (nothing cached yet: 404s); from now on nothing purges them.
    wait_for(lambda: demo.purges(photo) >= 1 and demo.purges(control) >= 1, 30, "the first purges")
    for rel, text in ((photo, "photo v1"), (control, "control v1")):
        wait_for(lambda rel=rel, text=text: demo.cached(rel, text), 15, f"{rel} cached by the edge")

    # The control: rewritten on content itself, behind upsync's back. The edge keeps its copy.
    node = demo.compose.one("content")
    demo.compose.exec(node, "sh", "-c", f"printf 'control v2' > /srv/uploads/{control}", user="10001")
    wait_for(lambda: demo.get(demo.content, control)[1] == "control v2", 10, "content to have control v2")
    assert demo.cached(control, "control v1"), "the edge does not cache: this test could not fail"

    # The photo: rewritten in the uploads. The sidecar syncs it to content, then its hook purges the edge.
    start = time.monotonic()
    demo.write((photo, "photo v2"))
    wait_for(lambda: demo.purges(photo) >= 2, 20, "the hook's PURGE of the rewritten photo")
    status, body, cache = demo.get(demo.edge, photo)
    assert (status, body, cache) == (200, "photo v2", "MISS")  # right after the hook ran
    TIMINGS.append(("cdn demo: rewrite in the uploads -> served new by the edge", time.monotonic() - start))
    assert demo.cached(control, "control v1")  # exactly the changed URL was purged

    # Deleted: 404 at the edge once the hook ran (the cached copy went with the purge).
    demo.write((photo, None))
    wait_for(lambda: demo.purges(photo) >= 3, 20, "the hook's PURGE of the deleted photo")
    assert demo.get(demo.edge, photo)[0] == 404

    # More than SYNC_HOOK_MAX_PATHS (3 here) in one sync: "all", one PURGE of everything. Now the control's
    # stale copy goes too.
    demo.write(*((f"2026/12/burst-{i}.jpg", "x") for i in range(10)))
    wait_for(lambda: demo.purges("*") >= 1, 20, "the purge of everything")
    assert demo.get(demo.edge, control)[1:] == ("control v2", "MISS")
    assert demo.metric("upsync_hook_everything_total", hook="command") >= 1
    assert demo.metric("upsync_hook_runs_total", hook="command", result="ok") >= 4
    assert demo.metric("upsync_hook_runs_total", hook="command", result="failed") == 0
