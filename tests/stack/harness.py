"""Drive the compose stack from the outside: docker/compose commands, WordPress over HTTP, polling.

Every wait has a deadline; every HTTP request goes to 127.0.0.1 (content's published port) or to a
container address of the project's own networks.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose" / "docker-compose.yml"
APP_UPLOADS = "/var/lib/wordpress/wp-content/uploads"
NODE_UPLOADS = "/srv/uploads"
UPLOADS_URL = "/wp-content/uploads/"
SERVICES = ("keys", "db", "app", "sidecar", "content", "fanout", "web")

T = TypeVar("T")

# (what, seconds) measured by the tests; printed in pytest's terminal summary.
TIMINGS: list[tuple[str, float]] = []


class CommandError(RuntimeError):
    """A docker command failed; the message has its output."""


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> tuple[T, float]:
    """Poll ``check`` until it returns a truthy value; returns it and the seconds it took.

    Raises:
        TimeoutError: with ``what`` and the last value seen, after ``timeout`` seconds.
    """
    start = time.monotonic()
    last: object = None
    while True:
        last = check()
        if last:
            return last, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def git_revision() -> str:
    """The checkout's commit (the images' revision label), or "unknown" outside a git checkout."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- docker / compose ----------------------------------------------------------------------------


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to the end (bounded); raise :class:`CommandError` with its output if it fails."""
    try:
        proc = subprocess.run(list(args), input=stdin, capture_output=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        raise CommandError(f"{' '.join(args)}: no result after {timeout:.0f} s\n{out[-4000:]}") from None
    if check and proc.returncode != 0:
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        raise CommandError(f"{' '.join(args)}: exit {proc.returncode}\n{out[-6000:]}")
    return proc


class Compose:
    """One compose project (``docker compose -p NAME -f compose/docker-compose.yml``)."""

    def __init__(self, project: str, env: Mapping[str, str]) -> None:
        self.project = project
        self.env = dict(env)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(
            ["docker", "compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            timeout=timeout,
            env=self.env,
            check=check,
        )

    def ids(self, service: str, *, all_states: bool = False) -> list[str]:
        """Container ids of a service, by replica number."""
        args = ["ps", "-q", *(["-a"] if all_states else []), service]
        ids = self(*args).stdout.decode().split()
        return sorted(
            ids, key=lambda c: int(self.inspect(c)["Config"]["Labels"]["com.docker.compose.container-number"])
        )

    def one(self, service: str) -> str:
        ids = self.ids(service, all_states=True)
        if len(ids) != 1:
            raise CommandError(f"expected one {service} container, found {ids}")
        return ids[0]

    @staticmethod
    def inspect(container: str) -> dict[str, Any]:
        return json.loads(run(["docker", "inspect", container]).stdout)[0]

    def address(self, container: str, network: str = "front") -> str:
        """The container's address on one of the project's networks."""
        nets = self.inspect(container)["NetworkSettings"]["Networks"]
        return str(nets[f"{self.project}_{network}"]["IPAddress"])

    @staticmethod
    def exec(
        container: str,
        *cmd: str,
        user: str | None = None,
        stdin: bytes | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        args = ["docker", "exec", *(["-i"] if stdin is not None else []), *(["-u", user] if user else [])]
        return run([*args, container, *cmd], stdin=stdin, check=check, timeout=timeout)

    def logs(self, services: Iterable[str], tail: int = 80) -> str:
        proc = self("logs", "--no-color", "--timestamps", "--tail", str(tail), *services, check=False, timeout=60)
        return (proc.stdout + proc.stderr).decode(errors="replace")


# ----- HTTP ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def request(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    timeout: float = 30,
) -> Response:
    """One request; any status is returned (not raised). Connection errors give status 0."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    opener = opener or urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), dict(exc.headers))
    except (urllib.error.URLError, OSError) as exc:
        return Response(0, str(exc).encode(), {})


def fetch(base: str, rel: str, timeout: float = 5) -> Response:
    """An upload by its path relative to the uploads directory, from one node (``http://addr[:port]``)."""
    return request(base + UPLOADS_URL + urllib.parse.quote(rel), timeout=timeout)


# ----- WordPress ------------------------------------------------------------------------------------


@dataclass
class Media:
    """One attachment: its id and every file WordPress made for it (relative path -> sha256)."""

    id: int
    files: dict[str, str] = field(default_factory=dict)


class WordPress:
    """The site, through a front (content's published port, or a web node)."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base.rstrip("/")
        self.user = user
        self.password = password
        self.app_password = ""

    def installed(self) -> bool:
        """Complete the install through the web installer if the app has not installed itself."""
        page = request(self.base + "/wp-admin/install.php", timeout=30)
        if page.status == 200 and b"Already Installed" in page.body:
            return True
        form = urllib.parse.urlencode(
            {
                "weblog_title": "upsync",
                "user_name": self.user,
                "admin_password": self.password,
                "admin_password2": self.password,
                "pw_weak": "1",
                "admin_email": "admin@example.com",
                "blog_public": "1",
            }
        ).encode()
        done = request(self.base + "/wp-admin/install.php?step=2", method="POST", data=form, timeout=60)
        return done.status == 200

    def make_app_password(self) -> str:
        """Log in with cookies, get a REST nonce, create an application password through the REST API."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPCookieProcessor(jar))
        request(self.base + "/wp-login.php", opener=opener)  # sets the test cookie
        form = urllib.parse.urlencode(
            {
                "log": self.user,
                "pwd": self.password,
                "wp-submit": "Log In",
                "redirect_to": self.base + "/wp-admin/",
                "testcookie": "1",
            }
        ).encode()
        login = request(self.base + "/wp-login.php", method="POST", data=form, opener=opener)
        if login.status != 302:
            raise AssertionError(f"login failed: {login.status} {login.body[:300]!r}")
        nonce = request(self.base + "/wp-admin/admin-ajax.php?action=rest-nonce", opener=opener)
        if nonce.status != 200:
            raise AssertionError(f"no REST nonce: {nonce.status} {nonce.body[:200]!r}")
        made = request(
            self.base + "/wp-json/wp/v2/users/me/application-passwords",
            method="POST",
            opener=opener,
            data=json.dumps({"name": f"stack-test-{secrets.token_hex(3)}"}).encode(),
            headers={"Content-Type": "application/json", "X-WP-Nonce": nonce.body.decode().strip()},
        )
        if made.status != 201:
            raise AssertionError(f"application password refused: {made.status} {made.body[:300]!r}")
        self.app_password = made.json()["password"]
        return self.app_password

    def _auth(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.user}:{self.app_password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def upload(self, name: str, data: bytes, base: str | None = None) -> tuple[dict[str, Any], float]:
        """POST a JPEG to /wp-json/wp/v2/media; returns the media JSON and the monotonic time of the answer."""
        headers = {
            **self._auth(),
            "Content-Type": "image/jpeg",
            "Content-Disposition": f'attachment; filename="{name}"',
        }
        resp = request(
            (base or self.base) + "/wp-json/wp/v2/media", method="POST", data=data, headers=headers, timeout=120
        )
        answered = time.monotonic()
        if resp.status != 201:
            raise AssertionError(f"upload of {name} failed: {resp.status} {resp.body[:500]!r}")
        return resp.json(), answered

    def delete(self, media_id: int) -> None:
        resp = request(f"{self.base}/wp-json/wp/v2/media/{media_id}?force=true", method="DELETE", headers=self._auth())
        if resp.status != 200 or not resp.json().get("deleted"):
            raise AssertionError(f"delete of {media_id} failed: {resp.status} {resp.body[:300]!r}")


def media_files(media: Mapping[str, Any]) -> list[str]:
    """Every file of an attachment (original and each generated size), relative to the uploads directory."""
    details = media["media_details"]
    folder = os.path.dirname(details["file"])
    files = {details["file"]}
    for size in details.get("sizes", {}).values():
        files.add(f"{folder}/{size['file']}" if folder else size["file"])
    if media.get("original_image"):
        files.add(f"{folder}/{media['original_image']}" if folder else media["original_image"])
    return sorted(files)


# ----- what every node must serve ----------------------------------------------------------------------


def missing(base: str, files: Mapping[str, str]) -> list[str]:
    """Files a node does not serve with exactly the expected bytes (empty: converged)."""
    bad = []
    for rel, digest in sorted(files.items()):
        resp = fetch(base, rel)
        if resp.status != 200:
            bad.append(f"{rel}: {resp.status}")
        elif sha256(resp.body) != digest:
            bad.append(f"{rel}: different bytes")
    return bad


def still_served(base: str, files: Iterable[str]) -> list[str]:
    """Files a node still serves (empty: all gone, 404)."""
    return [rel for rel in sorted(files) if fetch(base, rel).status != 404]


# ----- the stack under test ---------------------------------------------------------------------------

# A photo-like JPEG made by PHP's GD inside the app container: 1600x1200 is big enough for WordPress
# to make five sizes (150, 300, 768, 1024, 1536 wide) and small enough to upload in a fraction of a second.
_JPEG_PHP = r"""
[$w, $h, $seed] = array_map('intval', array_slice($argv, 1, 3));
mt_srand($seed);
$im = imagecreatetruecolor($w, $h);
for ($i = 0; $i < 300; $i++) {
    $c = imagecolorallocate($im, mt_rand(0, 255), mt_rand(0, 255), mt_rand(0, 255));
    imagefilledellipse($im, mt_rand(0, $w), mt_rand(0, $h), mt_rand(20, 500), mt_rand(20, 500), $c);
}
imagestring($im, 5, 20, 20, "upsync $seed", imagecolorallocate($im, 255, 255, 255));
imagejpeg($im, null, 90);
"""


class Stack:
    """The running project: its containers, its WordPress, and the files every node must serve.

    Attributes:
        live: relative path -> sha256 of every upload that must be on every node.
        gone: relative paths that were deleted and must be 404 everywhere.
    """

    def __init__(self, compose: Compose, port: int, admin_password: str) -> None:
        self.compose = compose
        self.front = f"http://127.0.0.1:{port}"
        self.wp = WordPress(self.front, "admin", admin_password)
        self.live: dict[str, str] = {}
        self.gone: set[str] = set()
        self._seed = 0

    def id(self, service: str) -> str:
        return self.compose.one(service)

    def web_nodes(self) -> dict[str, str]:
        """web-N -> http://address of every running web replica (its own address, port 80)."""
        ids = self.compose.ids("web")
        return {f"web-{n}": f"http://{self.compose.address(cid)}" for n, cid in enumerate(ids, 1)}

    def nodes(self) -> dict[str, str]:
        """Every node that serves the uploads: content (published port) and each web replica."""
        return {"content": self.front, **self.web_nodes()}

    def jpeg(self) -> bytes:
        self._seed += 1
        proc = self.compose.exec(self.id("app"), "php", "-r", _JPEG_PHP, "--", "1600", "1200", str(self._seed))
        assert proc.stdout[:3] == b"\xff\xd8\xff", "GD did not make a JPEG"
        return proc.stdout

    def upload(self, name: str, via: str | None = None) -> tuple[Media, float]:
        """Upload a fresh JPEG; returns the attachment (with each file's sha256 as written in the app's
        volume) and the monotonic time of the upload's answer."""
        doc, answered = self.wp.upload(name, self.jpeg(), base=via)
        media = Media(doc["id"])
        rels = media_files(doc)
        sums = self.compose.exec(self.id("app"), "sha256sum", *(f"{APP_UPLOADS}/{rel}" for rel in rels)).stdout
        for line in sums.decode().splitlines():
            digest, path = line.split(maxsplit=1)
            media.files[path.removeprefix(APP_UPLOADS + "/")] = digest
        assert sorted(media.files) == rels, f"the app's volume lacks some of {rels}"
        self.live.update(media.files)
        return media, answered

    def delete(self, media: Media) -> None:
        self.wp.delete(media.id)
        for rel in media.files:
            self.live.pop(rel, None)
            self.gone.add(rel)

    def wait_served(
        self,
        files: Mapping[str, str],
        timeout: float,
        nodes: Mapping[str, str] | None = None,
        what: str = "the uploads",
    ) -> float:
        """Wait until every node serves every file with the expected bytes; returns the seconds it took."""
        nodes = dict(nodes or self.nodes())

        def check() -> bool:
            return not any(missing(base, files) for base in nodes.values())

        try:
            _, took = wait_for(check, timeout, f"{what} on {', '.join(nodes)}", interval=0.05)
        except TimeoutError as exc:
            detail = {name: missing(base, files)[:5] for name, base in nodes.items()}
            raise AssertionError(f"{exc}; still missing: {detail}") from None
        return took

    def wait_gone(self, files: Iterable[str], timeout: float) -> float:
        files = sorted(files)
        nodes = self.nodes()
        try:
            _, took = wait_for(
                lambda: not any(still_served(b, files) for b in nodes.values()),
                timeout,
                f"deleted files to be 404 on {', '.join(nodes)}",
                interval=0.1,
            )
        except TimeoutError as exc:
            detail = {name: still_served(base, files)[:5] for name, base in nodes.items()}
            raise AssertionError(f"{exc}; still served: {detail}") from None
        return took

    def wait_front(self, timeout: float = 90) -> None:
        """Until WordPress answers through content again (after the app or content restarted)."""
        wait_for(
            lambda: request(self.front + "/wp-json/", timeout=5).status == 200,
            timeout,
            "WordPress to answer through content",
            interval=0.25,
        )

    def ready(self, service: str) -> bool:
        """The daemon's /readyz is 200 (first full sync reached every target)."""
        cid = self.id(service)
        return self.compose.exec(cid, "python", "-m", "sidecar", "health", "--ready", check=False).returncode == 0
