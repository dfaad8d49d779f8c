"""After a sync: tell the operator's hook command (``SYNC_HOOK_COMMAND``) and webhook (``SYNC_WEBHOOK_URL``)
what landed on a target and what went, so a cache or CDN in front of it can be purged.

Never on the replication path. A worker hands its sync's changes to :class:`Hooks` (:meth:`Hooks.submit`,
which never blocks) and goes on; a few runner threads deliver them. One run per target at a time; syncs
that arrive meanwhile merge into the one waiting run (union of the paths), so memory is bounded by one
waiting run per target of at most ``SYNC_HOOK_MAX_PATHS`` paths: past that the run lists none and says
``all`` ("purge everything"). Failures are logged and counted (``upsync_hook_runs_total``), never retried
for the command (it may not be idempotent) and retried with backoff for the webhook (tenacity); neither
ever fails or delays a sync.

What a hook gets (docs/hooks.md):

* the command: the paths on stdin as NUL-terminated records ``sent PATH`` / ``deleted PATH`` (a name may
  hold any byte but NUL), the facts in ``UPSYNC_*`` variables, SYNC_SOURCE as its working directory, and an
  environment of its own: PATH, HOME, the locale, TZ, TMPDIR (and nss_wrapper's, so ssh works for any uid)
  plus what ``SYNC_HOOK_ENV`` names; never the daemon's settings or secrets. Killed with its process group
  at ``SYNC_HOOK_TIMEOUT_S``;
* the webhook: ``POST`` of one JSON document with the same facts, ``X-Upsync-Signature: sha256=<hex>``
  (HMAC-SHA256 of the body with the secret of ``SYNC_WEBHOOK_SECRET_FILE``), ``X-Upsync-Delivery`` (the same
  on every retry of one delivery). Redirects are not followed. Only the URL's scheme and host are logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from . import __version__, logs
from .config import Config, invalid, url_shown
from .metrics import Metrics

__all__ = [
    "BASE_ENV",
    "Changes",
    "CommandHook",
    "Hooks",
    "Notice",
    "Webhook",
    "check_hooks",
    "make_hooks",
    "read_secret",
    "run_bounded",
]

log = logs.get("hooks")

# The only variables of the daemon's environment a hook command sees (besides SYNC_HOOK_ENV's names).
# nss_wrapper's: the image gives an arbitrary --user uid a passwd entry through them (ssh needs one).
BASE_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "LD_PRELOAD",
    "NSS_WRAPPER_PASSWD",
    "NSS_WRAPPER_GROUP",
    "PYTHONPYCACHEPREFIX",
)
# Runner threads per kind of hook: runs for different targets overlap up to this many.
THREADS = 4
# A webhook delivery: this many attempts, 1 s doubling to at most 30 s apart (about a minute in all).
WEBHOOK_ATTEMPTS = 6
# The last bytes of a hook's output kept for the log line of a failure.
OUTPUT_KEPT = 2000
SECRET_MAX = 65536


class Changes:
    """The paths one sync (or several merged) sent and deleted, listed up to ``limit`` in all; past that the
    lists are dropped and ``everything`` says so. Counting goes on past the limit.

    Example:
        >>> c = Changes(limit=2)
        >>> c.add("sent", "a.jpg"); c.add("deleted", "b.jpg"); bool(c), c.everything
        (True, False)
        >>> c.add("sent", "c.jpg"); c.everything, c.sent, c.sent_count
        (True, [], 2)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sent: dict[str, None] = {}
        self._deleted: dict[str, None] = {}
        self.sent_count = 0
        self.deleted_count = 0
        self.everything = False

    @property
    def sent(self) -> list[str]:
        return list(self._sent)

    @property
    def deleted(self) -> list[str]:
        return list(self._deleted)

    def add(self, what: str, path: str) -> None:
        """Record one path (``what``: ``sent`` or ``deleted``)."""
        listed = self._sent if what == "sent" else self._deleted
        if path in listed:
            return
        if what == "sent":
            self.sent_count += 1
        else:
            self.deleted_count += 1
        if self.everything:
            return
        listed[path] = None
        if len(self._sent) + len(self._deleted) > self.limit:
            self.overflow()

    def overflow(self) -> None:
        """Too many to list: say "everything" instead."""
        self.everything = True
        self._sent.clear()
        self._deleted.clear()

    def merge(self, other: Changes) -> None:
        if other.everything:
            self.sent_count += other.sent_count
            self.deleted_count += other.deleted_count
            self.overflow()
            return
        for path in other._sent:
            self.add("sent", path)
        for path in other._deleted:
            self.add("deleted", path)

    def __bool__(self) -> bool:
        return bool(self.sent_count or self.deleted_count or self.everything)


@dataclass
class Notice:
    """What one hook run reports: one target, one or more syncs merged."""

    target: str
    host: str
    kinds: list[str]
    changes: Changes
    syncs: int = 1
    time: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        """``batch`` or ``full``, or ``mixed`` for merged syncs of both kinds."""
        return self.kinds[0] if len(set(self.kinds)) == 1 else "mixed"

    def merge(self, kind: str, changes: Changes) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)
        self.changes.merge(changes)
        self.syncs += 1
        self.time = time.time()

    def facts(self) -> dict[str, Any]:
        """The facts every hook gets (the webhook's document, less the paths)."""
        c = self.changes
        return {
            "event": "synced",
            "target": self.target,
            "host": self.host,
            "kind": self.kind,
            "syncs": self.syncs,
            "all": c.everything,
            "sent_count": c.sent_count,
            "deleted_count": c.deleted_count,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)),
        }


class Sink(Protocol):
    """One kind of hook."""

    name: str

    def deliver(self, notice: Notice) -> str:
        """Deliver one notice; returns the result label (``ok``, ``failed``, ``timeout``, ``error``)."""
        ...

    def stop(self) -> None:
        """Shutdown: give up what runs now (kill, stop retrying)."""
        ...


# ----- the command -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """How a command run ended: its exit code (None: killed at the timeout, or it could not start)."""

    returncode: int | None
    output: bytes
    seconds: float
    error: str = ""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_bounded(
    argv: Sequence[str],
    stdin: bytes,
    env: Mapping[str, str],
    cwd: str | None,
    timeout: float,
    started: list[subprocess.Popen[bytes]] | None = None,
) -> Ran:
    """Run a command with ``stdin``, its output (stdout and stderr) kept up to :data:`OUTPUT_KEPT` bytes
    from the end, for at most ``timeout`` seconds. It runs in a process group of its own, which is killed
    at the timeout and once the command has exited (nothing it started is left running; something that made
    itself a new session escapes). A command that does not read its stdin is fine.

    Args:
        started: the process is appended here while it runs (so a shutdown can kill it).
    """
    start = time.monotonic()
    deadline = start + timeout
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return Ran(None, b"", time.monotonic() - start, f"cannot run {argv[0]}: {exc.strerror or exc}")
    if started is not None:
        started.append(proc)
    assert proc.stdin is not None
    assert proc.stdout is not None
    tail = bytearray()
    view, sent = memoryview(stdin), 0
    timed_out = False
    with selectors.DefaultSelector() as sel:
        os.set_blocking(proc.stdout.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = proc.poll() is None
                break
            # A short wake-up: a command that exited while something it started holds its output open
            # is done (that something is killed with the group below).
            for key, _ in sel.select(min(left, 0.2)):
                if key.fileobj is proc.stdin:
                    try:
                        sent += os.write(proc.stdin.fileno(), view[sent : sent + 65536])
                    except (BrokenPipeError, ConnectionResetError):
                        sent = len(view)  # it does not read its stdin: fine
                    except BlockingIOError:
                        continue
                    if sent >= len(view):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(proc.stdout)
                    continue
                tail += chunk
                del tail[:-OUTPUT_KEPT]
            if proc.poll() is not None and proc.stdout in sel.get_map():
                with contextlib.suppress(BlockingIOError, OSError):
                    while chunk := os.read(proc.stdout.fileno(), 65536):
                        tail += chunk
                        del tail[:-OUTPUT_KEPT]
                break
    if not timed_out:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    _kill_group(proc.pid)  # the timeout, or what it left behind
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            pipe.close()
    if started is not None:
        with contextlib.suppress(ValueError):
            started.remove(proc)
    return Ran(None if timed_out else proc.returncode, bytes(tail), time.monotonic() - start)


def _printable(data: bytes, limit: int = 600) -> str:
    text = data.decode("utf-8", "replace").strip()
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text[-limit:]


class CommandHook:
    """``SYNC_HOOK_COMMAND``.

    Args:
        argv: the command line (already split).
        timeout_s: ``SYNC_HOOK_TIMEOUT_S``.
        pass_env: ``SYNC_HOOK_ENV``.
        source: the source directory (its working directory, ``UPSYNC_SOURCE``).
        environ: the daemon's environment (tests).
    """

    name = "command"

    def __init__(
        self,
        argv: Sequence[str],
        timeout_s: float,
        pass_env: Sequence[str],
        source: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s
        self.source = source
        env = os.environ if environ is None else environ
        self.base_env = {k: env[k] for k in (*BASE_ENV, *pass_env) if k in env}
        self._running: list[subprocess.Popen[bytes]] = []

    def environment(self, notice: Notice) -> dict[str, str]:
        """The hook's whole environment: the allowed variables plus the facts.

        Example:
            >>> h = CommandHook(["true"], 5, ["CDN_TOKEN"], "/srv", {"PATH": "/bin", "CDN_TOKEN": "t", "SYNC_X": "s"})
            >>> env = h.environment(Notice("ssh://u@h:22/", "h", ["batch"], Changes(10)))
            >>> sorted(k for k in env if not k.startswith("UPSYNC_")), env["UPSYNC_ALL"], env["UPSYNC_KIND"]
            (['CDN_TOKEN', 'PATH'], '0', 'batch')
        """
        f = notice.facts()
        return {
            **self.base_env,
            "UPSYNC_EVENT": f["event"],
            "UPSYNC_TARGET": f["target"],
            "UPSYNC_TARGET_HOST": f["host"],
            "UPSYNC_KIND": f["kind"],
            "UPSYNC_SYNCS": str(f["syncs"]),
            "UPSYNC_ALL": "1" if f["all"] else "0",
            "UPSYNC_SENT": str(f["sent_count"]),
            "UPSYNC_DELETED": str(f["deleted_count"]),
            "UPSYNC_TIME": f["time"],
            "UPSYNC_SOURCE": self.source,
        }

    @staticmethod
    def stdin(notice: Notice) -> bytes:
        r"""The paths, NUL-terminated records ``sent PATH`` / ``deleted PATH`` (none when ``all``).

        Example:
            >>> c = Changes(10); c.add("sent", "a\nb.jpg"); c.add("deleted", "old/")
            >>> CommandHook.stdin(Notice("t", "h", ["batch"], c))
            b'sent a\nb.jpg\x00deleted old/\x00'
        """
        c = notice.changes
        records = [b"sent " + os.fsencode(p) for p in c.sent] + [b"deleted " + os.fsencode(p) for p in c.deleted]
        return b"".join(r + b"\0" for r in records)

    def deliver(self, notice: Notice) -> str:
        ran = run_bounded(
            self.argv, self.stdin(notice), self.environment(notice), self.source, self.timeout_s, self._running
        )
        fields: dict[str, Any] = {"target": notice.target, "hook": self.name, "ms": round(ran.seconds * 1000)}
        if ran.error:
            log.warning("hook could not start", extra={"fields": {**fields, "error": ran.error}})
            return "error"
        if ran.returncode is None:
            fields.update(timeout_s=self.timeout_s, output=_printable(ran.output))
            log.warning("hook killed at SYNC_HOOK_TIMEOUT_S", extra={"fields": fields})
            return "timeout"
        if ran.returncode != 0:
            fields.update(exit=ran.returncode, output=_printable(ran.output))
            log.warning("hook failed", extra={"fields": fields})
            return "failed"
        return "ok"

    def stop(self) -> None:
        for proc in list(self._running):
            _kill_group(proc.pid)


# ----- the webhook -------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would send the body (and its signature) somewhere the operator did not name.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Retry(Exception):
    """An attempt worth repeating (network, timeout, 5xx, 408, 429)."""


class _Failed(Exception):
    """An answer that repeating cannot change (4xx, a redirect)."""


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Upsync-Signature`` value.

    Example:
        >>> signature(b"s3cret", b'{"event":"synced"}')
        'sha256=3837b3f3ff13be0e1e0fc041e8d69db74063d8f83b99e33001aaa7b112d89dbd'
    """
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Webhook:
    """``SYNC_WEBHOOK_URL``.

    Args:
        url: where to POST.
        secret: the HMAC key (None: unsigned).
        timeout_s: each attempt's time limit.
        max_bytes: ``SYNC_WEBHOOK_MAX_BYTES``.
        source: the source directory (in the document).
        attempts: deliveries tried at most this often.
        wait: tenacity's wait between attempts (tests shorten it).
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: bytes | None,
        timeout_s: float,
        max_bytes: int,
        source: str,
        attempts: int = WEBHOOK_ATTEMPTS,
        wait: Any = None,
    ) -> None:
        self.url = url
        self.shown = url_shown(url)
        self._secret = secret
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.source = source
        self.attempts = attempts
        self.wait = wait or wait_exponential_jitter(initial=1, max=30, jitter=1)
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect)

    def body(self, notice: Notice) -> tuple[bytes, bool]:
        """The JSON document (ASCII: names that are not UTF-8 are kept as ``\\udcXX`` escapes), and whether it
        had to drop the paths to stay under ``max_bytes``."""
        doc = {**notice.facts(), "source": self.source, "sent": notice.changes.sent, "deleted": notice.changes.deleted}
        body = json.dumps(doc, separators=(",", ":")).encode("ascii")
        if len(body) <= self.max_bytes:
            return body, False
        doc.update(all=True, sent=[], deleted=[])
        return json.dumps(doc, separators=(",", ":")).encode("ascii"), True

    def headers(self, body: bytes, delivery: str) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"upsync/{__version__}",
            "X-Upsync-Event": "synced",
            "X-Upsync-Delivery": delivery,
        }
        if self._secret is not None:
            headers["X-Upsync-Signature"] = signature(self._secret, body)
        return headers

    def _post(self, body: bytes, headers: Mapping[str, str]) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST", headers=dict(headers))
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as exc:
            code = exc.code
            exc.close()
            if 300 <= code < 400:
                raise _Failed(f"answered {code}: redirects are not followed (give the final URL)") from None
            if code >= 500 or code in (408, 429):
                raise _Retry(f"answered {code}") from None
            raise _Failed(f"answered {code}") from None
        except (urllib.error.URLError, OSError) as exc:  # TimeoutError included
            reason = getattr(exc, "reason", exc)
            raise _Retry(f"cannot reach it: {reason}") from None

    def deliver(self, notice: Notice) -> str:
        body, dropped = self.body(notice)
        if dropped:
            notice.changes.overflow()  # counted as "all" by the runner
        delivery = uuid.uuid4().hex
        headers = self.headers(body, delivery)
        fields = {"target": notice.target, "hook": self.name, "url": self.shown, "delivery": delivery}

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "webhook failed; retrying",
                extra={
                    "fields": {
                        **fields,
                        "error": str(exc),
                        "attempt": state.attempt_number,
                        "retry_in_s": round(wait, 1),
                    }
                },
            )

        retrying = Retrying(
            retry=retry_if_exception_type(_Retry),
            stop=stop_after_attempt(self.attempts) | (lambda _: self._stop.is_set()),
            wait=self.wait,
            sleep=self._stop.wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._post, body, headers)
        except (_Retry, _Failed) as exc:
            log.warning("webhook failed", extra={"fields": {**fields, "error": str(exc)}})
            return "failed"
        return "ok"

    def stop(self) -> None:
        self._stop.set()


# ----- the runners -------------------------------------------------------------------------------------


class _Runner:
    """Delivers one sink's notices: one waiting notice per target (later syncs merge into it), one run per
    target at a time, up to :data:`THREADS` targets at once."""

    def __init__(self, sink: Sink, metrics: Metrics | None) -> None:
        self.sink = sink
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, Notice] = OrderedDict()
        self._running: set[str] = set()
        self._closing = False
        self.delivered = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"hook {sink.name} {i}", daemon=True) for i in range(THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, target: str, host: str, kind: str, changes: Changes) -> None:
        with self._cond:
            if self._closing:
                return
            waiting = self._waiting.get(target)
            if waiting is not None:
                waiting.merge(kind, changes)
                if self.metrics is not None:
                    self.metrics.hook_merged.labels(self.sink.name, target).inc()
                return
            merged = Changes(changes.limit)
            merged.merge(changes)
            self._waiting[target] = Notice(target, host, [kind], merged)
            self._cond.notify()

    def _take(self) -> Notice | None:
        with self._cond:
            while True:
                for target in self._waiting:
                    if target not in self._running:
                        self._running.add(target)
                        return self._waiting.pop(target)
                if self._closing and not self._waiting:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        while (notice := self._take()) is not None:
            start = time.monotonic()
            try:
                result = self.sink.deliver(notice)
            except Exception:  # a bug must not end the runner: count it and go on
                log.exception("hook runner error", extra={"fields": {"target": notice.target, "hook": self.sink.name}})
                result = "error"
            took = time.monotonic() - start
            with self._cond:
                self._running.discard(notice.target)
                self.delivered += 1
                self._cond.notify_all()
            self._count(notice, result, took)

    def _count(self, notice: Notice, result: str, took: float) -> None:
        c = notice.changes
        if result == "ok":
            log.info(
                "hook ran",
                extra={
                    "fields": {
                        "target": notice.target,
                        "hook": self.sink.name,
                        "kind": notice.kind,
                        "syncs": notice.syncs,
                        "sent": c.sent_count,
                        "deleted": c.deleted_count,
                        "all": c.everything,
                        "ms": round(took * 1000),
                    }
                },
            )
        if self.metrics is not None:
            self.metrics.hook_runs.labels(self.sink.name, notice.target, result).inc()
            self.metrics.hook_duration.labels(self.sink.name).observe(took)
            if c.everything:
                self.metrics.hook_everything.labels(self.sink.name, notice.target).inc()

    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    def close(self, deadline: float) -> None:
        """Deliver what waits until ``deadline``, then give up what still runs."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.01, deadline - time.monotonic()))
            left = len(self._waiting) + len(self._running)
            self._waiting.clear()
        if left:
            log.warning("hook runs given up at shutdown", extra={"fields": {"hook": self.sink.name, "runs": left}})
        self.sink.stop()
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 2)


class Hooks:
    """Every configured hook, fed by the workers.

    Args:
        sinks: the command and/or the webhook.
        max_paths: ``SYNC_HOOK_MAX_PATHS``.
        metrics: where to count (None: nowhere).
    """

    def __init__(self, sinks: Sequence[Sink], max_paths: int, metrics: Metrics | None = None) -> None:
        self.max_paths = max_paths
        self.runners = [_Runner(sink, metrics) for sink in sinks]

    def changes(self) -> Changes:
        """An empty record for one sync."""
        return Changes(self.max_paths)

    def submit(self, target: str, host: str, kind: str, changes: Changes) -> None:
        """Hand over what a successful sync changed (nothing happens when it changed nothing). Never blocks."""
        if not changes:
            return
        for runner in self.runners:
            runner.submit(target, host, kind, changes)

    def idle(self) -> bool:
        return all(r.idle() for r in self.runners)

    def close(self, deadline: float) -> None:
        for runner in self.runners:
            runner.close(deadline)


# ----- configuration -------------------------------------------------------------------------------------


def read_secret(path: Path) -> bytes:
    """The webhook secret: the file's bytes without trailing newlines.

    Raises:
        ConfigError: the file is missing, unreadable, empty or implausibly large.
    """
    name = "SYNC_WEBHOOK_SECRET_FILE"
    try:
        with open(path, "rb") as fh:
            data = fh.read(SECRET_MAX + 1)
    except FileNotFoundError:
        raise invalid(name, str(path), "an existing file holding the webhook secret (mount it there)") from None
    except IsADirectoryError:
        raise invalid(name, str(path), "a file holding the webhook secret, not a directory") from None
    except OSError as exc:
        raise invalid(name, str(path), f"readable by uid {os.getuid()} ({exc.strerror})") from None
    secret = data.rstrip(b"\r\n")
    if not secret.strip():
        raise invalid(name, str(path), "a file holding the webhook secret (it is empty)")
    if len(data) > SECRET_MAX:
        raise invalid(name, str(path), f"a file of at most {SECRET_MAX} bytes holding the webhook secret")
    return secret


def check_hooks(cfg: Config) -> str:
    """Pre-flight: the hook command can be run and the secret read (raises :class:`ConfigError`)."""
    notes = []
    if cfg.hook_command:
        program = cfg.hook_command[0]
        found = shutil.which(program) if "/" not in program else program
        if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
            where = "is not on PATH" if "/" not in program else "is not an executable file"
            raise invalid(
                "SYNC_HOOK_COMMAND",
                " ".join(cfg.hook_command),
                f"a command whose program exists and can be run ({program} {where})",
            )
        notes.append(f"hook {found}")
    if cfg.webhook_secret_file is not None:
        read_secret(cfg.webhook_secret_file)
    if cfg.webhook_url:
        notes.append(f"webhook {url_shown(cfg.webhook_url)}" + (" (signed)" if cfg.webhook_secret_file else ""))
    return ", ".join(notes) or "none"


def make_hooks(cfg: Config, source: str, metrics: Metrics | None) -> Hooks | None:
    """The hooks ``cfg`` asks for (None when none).

    Raises:
        ConfigError: the secret file cannot be read.
    """
    sinks: list[Sink] = []
    if cfg.hook_command:
        sinks.append(CommandHook(cfg.hook_command, cfg.hook_timeout_s, cfg.hook_env, source))
    if cfg.webhook_url:
        secret = read_secret(cfg.webhook_secret_file) if cfg.webhook_secret_file is not None else None
        sinks.append(Webhook(cfg.webhook_url, secret, cfg.hook_timeout_s, cfg.webhook_max_bytes, source))
    if not sinks:
        return None
    return Hooks(sinks, cfg.hook_max_paths, metrics)
