"""The one table of settings, and the only module that reads the environment.

Every setting is an environment variable prefixed ``SYNC_`` and the matching command-line flag
(``SYNC_QUIET_MS`` <-> ``--quiet-ms``). Values are taken, first match wins, from: the flag, the real
environment, the ``.env`` file (``SYNC_ENV_FILE``, read with python-dotenv), the default.

An invalid value raises :class:`ConfigError` with one line of the form
``invalid SYNC_X="value": must be ...``; the CLI turns it into exit code 2.
The README table and ``.env.example`` are generated from :data:`SETTINGS` by :mod:`sidecar.docgen`; the
checks of the host (does the source exist, can ssh load the key) are :mod:`sidecar.check`'s.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .filters import pattern_error
from .targets import Target, TargetError, parse_targets

__all__ = ["ENTRYPOINT_ONLY", "SETTINGS", "Config", "ConfigError", "Setting", "invalid", "load", "url_shown"]

PREFIX = "SYNC_"
# Read by the image's entrypoint (inline secrets written to private files), not by Python.
ENTRYPOINT_ONLY = {
    "SYNC_SSH_KEY": "private key text; the image's entrypoint writes it to a private file",
    "SYNC_SSH_KNOWN_HOSTS": "known_hosts text; the image's entrypoint writes it to a private file",
    "SYNC_WEBHOOK_SECRET": "the webhook's signing secret; the image's entrypoint writes it to a private file",
}


class ConfigError(Exception):
    """A setting the daemon cannot start with. ``str()`` is the one line shown to the operator.

    Attributes:
        warnings: what :func:`load` would have warned about (unknown names), shown before the error.
    """

    def __init__(self, message: str, warnings: list[str] | None = None) -> None:
        super().__init__(message)
        self.warnings = warnings or []


@dataclass(frozen=True)
class Setting:
    """One row of the settings table.

    Args:
        name: the environment variable (``SYNC_...``).
        default: the default, as it would be written in the environment (``None``: required).
        form: what a valid value looks like; completes "must be ...".
        parse: turns the text into the typed value; raises ``ValueError`` when the text is invalid.
        help: one sentence for the README table and ``.env.example``.
        group: heading in the generated docs.
    """

    name: str
    default: str | None
    form: str
    parse: Callable[[str], Any]
    help: str
    group: str

    @property
    def attr(self) -> str:
        return self.name[len(PREFIX) :].lower()

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")


def _int(lo: int, hi: int, unit: str = "") -> tuple[str, Callable[[str], int]]:
    form = f"a whole number from {lo} to {hi}" + (f" ({unit})" if unit else "")

    def parse(text: str) -> int:
        text = text.strip()
        if not re.fullmatch(r"[0-9]+", text) or not lo <= int(text) <= hi:
            raise ValueError(f"must be {form}")
        return int(text)

    return form, parse


def _choice(*choices: str) -> tuple[str, Callable[[str], str]]:
    form = "one of " + ", ".join(choices)

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be {form}")
        return value

    return form, parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool() -> tuple[str, Callable[[str], bool]]:
    form = "true or false"

    def parse(text: str) -> bool:
        value = text.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"must be {form}")

    return form, parse


def _path(optional: bool = False) -> tuple[str, Callable[[str], Path | None]]:
    form = "a file system path" + (" or empty" if optional else "")

    def parse(text: str) -> Path | None:
        text = text.strip()
        if not text:
            if optional:
                return None
            raise ValueError(f"must be {form}")
        if "\0" in text:
            raise ValueError(f"must be {form}")
        return Path(os.path.expanduser(text))

    return form, parse


def _targets() -> tuple[str, Callable[[str], tuple[Target, ...]]]:
    form = "a comma-separated list of ssh://user@host[:port]/abs/path (or user@host:/abs/path, dns+ssh://...)"

    def parse(text: str) -> tuple[Target, ...]:
        try:
            return parse_targets(text)
        except TargetError as exc:
            raise ValueError(str(exc)) from None

    return form, parse


def _http_addr() -> tuple[str, Callable[[str], tuple[str, int] | None]]:
    form = "host:port (e.g. 127.0.0.1:9110), :port for all interfaces, or empty to disable"

    def parse(text: str) -> tuple[str, int] | None:
        text = text.strip()
        if not text:
            return None
        host, colon, port = text.rpartition(":")
        if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"must be {form}")
        host = host.strip("[]") or "0.0.0.0"
        return host, int(port)

    return form, parse


_CHMOD_ITEM = re.compile(r"^[DF]?(?:[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*)$")


def _chmod() -> tuple[str, Callable[[str], str]]:
    form = 'rsync --chmod rules like "D755,F644" or "Du=rwx,go=rx", or empty to keep the source\'s modes'

    def parse(text: str) -> str:
        text = text.strip().replace(" ", "")
        if text and not all(_CHMOD_ITEM.match(item) for item in text.split(",")):
            raise ValueError(f"must be {form}")
        return text

    return form, parse


def _patterns() -> tuple[str, Callable[[str], tuple[str, ...]]]:
    form = "a comma-separated list of rsync exclude patterns (e.g. *.tmp,/cache/), or empty"

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        for item in items:
            if problem := pattern_error(item):
                raise ValueError(f"must be {form}; {_show(item)} has {problem}")
        return items

    return form, parse


def _command() -> tuple[str, Callable[[str], tuple[str, ...]]]:
    form = "a command line (split as a shell would, run without one: `sh -c '...'` for pipes), or empty"

    def parse(text: str) -> tuple[str, ...]:
        if "\0" in text:
            raise ValueError(f"must be {form}")
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:  # an unclosed quote
            raise ValueError(f"must be {form} ({exc})") from None
        return argv

    return form, parse


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_names() -> tuple[str, Callable[[str], tuple[str, ...]]]:
    form = "a comma-separated list of environment variable names (not SYNC_* or UPSYNC_*), or empty"

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        for name in names:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"must be {form}; {_show(name)} is not a variable name")
            if name.upper().startswith(("SYNC_", "UPSYNC_")):
                raise ValueError(f"must be {form}; {name} is upsync's own (settings may name secrets)")
        return names

    return form, parse


def url_shown(url: str) -> str:
    """A webhook URL as it may be shown: scheme and host only (its path or query may hold a token).

    Example:
        >>> url_shown("https://hooks.example.com:8443/T0/B1/secret?x=1"), url_shown("https://u:p@h/x")
        ('https://hooks.example.com:8443/…', 'https://h/…')
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        scheme, host = parts.scheme, parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a bad port or IPv6 literal
        scheme = host = port = ""
    if not scheme or not host or not all(c.isprintable() and not c.isspace() for c in scheme + host):
        return "(not shown: it may hold a token)"
    return f"{scheme}://{host}{port}/…"


def _webhook_url() -> tuple[str, Callable[[str], str]]:
    form = "an http:// or https:// URL with a host and no user:password@, or empty"

    def parse(text: str) -> str:
        text = text.strip()
        if not text:
            return ""
        if any(not c.isprintable() or c.isspace() for c in text):
            raise ValueError(f"must be {form}")
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port  # raises ValueError when it is not a number in range
        except ValueError:
            raise ValueError(f"must be {form}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise ValueError(f"must be {form}")
        if "@" in parts.netloc:
            # urllib would not send them (and they would be logged with the URL): a token belongs in the
            # path or query, a signature in SYNC_WEBHOOK_SECRET_FILE.
            raise ValueError(f"must be {form} (put a token in the path or use SYNC_WEBHOOK_SECRET_FILE)")
        return text

    return form, parse


_RATE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)[KMGkmg]?")


def _rate() -> tuple[str, Callable[[str], str]]:
    form = "a rate for rsync --bwlimit: a number in KiB/s, or with a K, M or G suffix (e.g. 20M), 0 for no limit"

    def parse(text: str) -> str:
        value = text.strip()
        if not _RATE.fullmatch(value):
            raise ValueError(f"must be {form}")
        number = float(value.rstrip("KMGkmg"))
        if number == 0:
            return "0"
        scale = {"k": 1, "m": 1024, "g": 1024 * 1024}.get(value[-1].lower(), 1)
        if number * scale < 1:
            raise ValueError(f"must be {form} (at least 1 KiB/s)")
        return value.upper()

    return form, parse


def _row(name: str, default: str | None, kind: tuple[str, Callable[[str], Any]], help_: str, group: str) -> Setting:
    return Setting(name, default, kind[0], kind[1], help_, group)


_G_WHAT = "What and where"
_G_BATCH = "Batching and reconcile"
_G_DELETE = "Deletes"
_G_XFER = "Transfer"
_G_SSH = "SSH"
_G_RUN = "Running"
_G_HOOKS = "Hooks"
_G_PROGRESS = "Progress and bandwidth"

SETTINGS: tuple[Setting, ...] = (
    _row("SYNC_SOURCE", None, _path(), "Directory to replicate (the uploads volume). Required.", _G_WHAT),
    _row(
        "SYNC_TARGETS",
        None,
        _targets(),
        "Where to replicate: comma-separated `ssh://user@host[:port]/abs/path`, `user@host:/abs/path`, or "
        "`dns+ssh://user@name[:port]/abs/path` (every address the name resolves to). Required.",
        _G_WHAT,
    ),
    _row(
        "SYNC_MODE",
        "watch",
        _choice("watch", "interval", "once"),
        "`watch`: replicate each change as it happens, plus a full reconcile every "
        "`SYNC_FULL_SYNC_INTERVAL`; `interval`: no watcher, a full sync every interval; "
        "`once`: one full sync, exit with its status.",
        _G_WHAT,
    ),
    _row(
        "SYNC_ENV_FILE",
        ".env",
        _path(optional=True),
        "File of `SYNC_*=value` lines read at start (the real environment wins); a missing default "
        "file is ignored, a missing named file is an error.",
        _G_WHAT,
    ),
    _row(
        "SYNC_QUIET_MS",
        "20",
        _int(1, 10000, "milliseconds"),
        "Hand a batch over once the tree has been quiet this long.",
        _G_BATCH,
    ),
    _row(
        "SYNC_MAX_DELAY_MS",
        "100",
        _int(1, 60000, "milliseconds"),
        "Never hold a batch longer than this while changes keep coming (a burst then flows as a "
        "pipeline: changes merge while a batch is being sent).",
        _G_BATCH,
    ),
    _row(
        "SYNC_FULL_SYNC_INTERVAL",
        "3600",
        _int(0, 31536000, "seconds"),
        "Full reconcile every this many seconds (catches events the kernel dropped); 0 turns the "
        "periodic reconcile off in watch mode.",
        _G_BATCH,
    ),
    _row(
        "SYNC_MAX_PENDING",
        "20000",
        _int(100, 10000000, "paths"),
        "Changed paths a target may have waiting (target down); past this the target falls back to "
        "one full sync, so memory stays bounded.",
        _G_BATCH,
    ),
    _row(
        "SYNC_WRITE_WAIT_S",
        "300",
        _int(0, 86400, "seconds"),
        "A file still open for writing is held back until it is closed, at most this long.",
        _G_BATCH,
    ),
    _row(
        "SYNC_EXCLUDE",
        "",
        _patterns(),
        "rsync exclude patterns, comma-separated; excluded paths are neither sent nor deleted.",
        _G_BATCH,
    ),
    _row(
        "SYNC_WATCH_BACKEND",
        "auto",
        _choice("auto", "inotify", "poll"),
        "`auto`: inotify, falling back to polling (with a warning) when the watch limit is reached; "
        "`inotify`: stop with an error instead; `poll`: always poll (network file systems).",
        _G_BATCH,
    ),
    _row(
        "SYNC_POLL_INTERVAL_MS",
        "1000",
        _int(50, 600000, "milliseconds"),
        "Scan interval of the polling backend.",
        _G_BATCH,
    ),
    _row("SYNC_DELETE", "true", _bool(), "Propagate deletes to the targets.", _G_DELETE),
    _row(
        "SYNC_MAX_DELETE",
        "1000",
        _int(1, 100000000, "paths"),
        "Refuse any one sync that would delete more than this many paths on a target (the delete "
        "guard: logged, /readyz turns 503, nothing is deleted).",
        _G_DELETE,
    ),
    _row(
        "SYNC_MAX_DELETE_PERCENT",
        "10",
        _int(1, 100, "percent"),
        "Refuse any one sync that would delete more than this share of the paths the target holds (once it "
        "deletes more than 20 paths): a source that lost most of its files never wipes a small site.",
        _G_DELETE,
    ),
    _row(
        "SYNC_CHMOD",
        "D755,F644",
        _chmod(),
        "Modes given to files and directories on the target (rsync `--chmod`); empty keeps the source's modes.",
        _G_XFER,
    ),
    _row(
        "SYNC_IO_TIMEOUT_S",
        "60",
        _int(5, 3600, "seconds"),
        "Abort a transfer that moves no data for this long (rsync `--timeout`).",
        _G_XFER,
    ),
    _row(
        "SYNC_RETRY_MAX_S",
        "60",
        _int(1, 3600, "seconds"),
        "Cap of the exponential backoff (with jitter) between retries to a failing target.",
        _G_XFER,
    ),
    _row(
        "SYNC_MAX_PARALLEL",
        "0",
        _int(0, 1024, "rsync runs; 0: eight per CPU core"),
        "How many rsync runs may start at once across all targets (a run that takes longer than a second "
        "stops counting: it waits on the network, not the CPU).",
        _G_XFER,
    ),
    _row(
        "SYNC_SANDBOX",
        "auto",
        _choice("auto", "required", "off"),
        "Confine the rsync sender with Landlock so it can read nothing outside `SYNC_SOURCE` but the "
        "system's own files: `auto` where the kernel offers it (a warning otherwise), `required` refuses to "
        "start without it, `off` never.",
        _G_XFER,
    ),
    _row(
        "SYNC_SSH_KEY_FILE",
        "/etc/upsync/ssh/id_ed25519",
        _path(),
        "Private key for the targets. A key others can read is used through a private 0600 copy, with a warning.",
        _G_SSH,
    ),
    _row(
        "SYNC_SSH_KNOWN_HOSTS_FILE",
        "/etc/upsync/ssh/known_hosts",
        _path(),
        "Pinned host keys of the targets (known_hosts format).",
        _G_SSH,
    ),
    _row(
        "SYNC_SSH_HOST_KEY_POLICY",
        "strict",
        _choice("strict", "accept-new"),
        "`strict`: only pinned host keys; `accept-new`: trust a host's first key and write it to "
        "the known_hosts file (which must then be writable).",
        _G_SSH,
    ),
    _row("SYNC_SSH_CONNECT_TIMEOUT_S", "10", _int(1, 600, "seconds"), "TCP connect and ssh handshake timeout.", _G_SSH),
    _row(
        "SYNC_RESOLVE_INTERVAL_S",
        "30",
        _int(1, 86400, "seconds"),
        "How often `dns+ssh://` targets are resolved again (web nodes added or removed).",
        _G_SSH,
    ),
    _row(
        "SYNC_HTTP_ADDR",
        "127.0.0.1:9110",
        _http_addr(),
        "Listen address of `/healthz`, `/readyz` and `/metrics`; empty disables.",
        _G_RUN,
    ),
    _row(
        "SYNC_UNHEALTHY_AFTER_S",
        "600",
        _int(0, 86400, "seconds"),
        "`/healthz` (the image's HEALTHCHECK) fails while a target needs the operator, or has been failing "
        "for longer than this; 0: failing targets never make it fail.",
        _G_RUN,
    ),
    _row("SYNC_LOG_FORMAT", "text", _choice("text", "json"), "One line per event, as text or JSON.", _G_RUN),
    _row("SYNC_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"), "Least severe level logged.", _G_RUN),
    _row(
        "SYNC_SHUTDOWN_GRACE_S",
        "10",
        _int(0, 3600, "seconds"),
        "On SIGTERM/SIGINT, time allowed to flush pending changes to reachable targets.",
        _G_RUN,
    ),
    _row(
        "SYNC_RUNTIME_DIR",
        "",
        _path(optional=True),
        "Where the private (0700) directory for ssh control sockets and key copies is made; empty: "
        "the system temp directory. Must be writable (a tmpfs with a read-only root).",
        _G_RUN,
    ),
    # ----- after a sync: hooks (sidecar.hooks) -----------------------------------------------------
    _row(
        "SYNC_HOOK_COMMAND",
        "",
        _command(),
        "Run after each sync that sent or deleted something, per target, off the replication path: the paths "
        "on stdin (`sent PATH` / `deleted PATH`, NUL-terminated), the facts in `UPSYNC_*` variables "
        "(docs/hooks.md). Its failures are logged and counted, never retried.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_HOOK_TIMEOUT_S",
        "30",
        _int(1, 3600, "seconds"),
        "A hook still running after this long is killed (with its process group); also the time limit of "
        "each webhook attempt.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_HOOK_ENV",
        "",
        _env_names(),
        "Names of the sidecar's environment variables the hook may see (e.g. a CDN token); by default it "
        "gets only PATH, HOME, locale, TZ, TMPDIR and the `UPSYNC_*` facts.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_HOOK_MAX_PATHS",
        "1000",
        _int(0, 1000000, "paths"),
        "A hook or webhook run listing more paths than this lists none and says `all` (purge everything) "
        "instead; syncs that pile up while a hook is busy merge into one run.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_WEBHOOK_URL",
        "",
        _webhook_url(),
        "POST a JSON document with the same facts here after each such sync (retried with backoff, 6 "
        "attempts); only its scheme and host are ever logged.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_WEBHOOK_SECRET_FILE",
        "",
        _path(optional=True),
        "File holding a secret: each webhook body is signed with it, `X-Upsync-Signature: sha256=<hex HMAC>`.",
        _G_HOOKS,
    ),
    _row(
        "SYNC_WEBHOOK_MAX_BYTES",
        "1048576",
        _int(1024, 104857600, "bytes"),
        "Largest webhook body; a larger one is sent as `all` with no paths listed.",
        _G_HOOKS,
    ),
    # ----- long full syncs (sidecar.progress) -------------------------------------------------------
    _row(
        "SYNC_PROGRESS_INTERVAL_S",
        "30",
        _int(0, 86400, "seconds"),
        "While a full sync runs, log its progress (files, bytes, percent, ETA) this often; 0: no log lines "
        "(the gauges and `/readyz` still show it).",
        _G_PROGRESS,
    ),
    _row(
        "SYNC_BWLIMIT",
        "0",
        _rate(),
        "Cap every rsync run's transfer rate (rsync `--bwlimit`, per target: N targets may use N times it).",
        _G_PROGRESS,
    ),
    _row(
        "SYNC_RESUME",
        "false",
        _bool(),
        "Full syncs keep a file cut mid-transfer in `.upsync-partial/` on the target and resume from it (rsync "
        "`--partial-dir`, delta transfer). Needs a receiver that keeps partial data: rrsync 3.5's jail drops it "
        "(docs/progress.md#resumable-transfers).",
        _G_PROGRESS,
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}
# Settings whose value may be a secret: an error shows only the URL's scheme and host.
_SECRET_VALUES = {"SYNC_WEBHOOK_URL"}


@dataclass(frozen=True)
class Config:
    """Validated settings; one attribute per row of :data:`SETTINGS` (``SYNC_QUIET_MS`` -> ``quiet_ms``)."""

    source: Path
    targets: tuple[Target, ...]
    mode: str
    env_file: Path | None
    quiet_ms: int
    max_delay_ms: int
    full_sync_interval: int
    max_pending: int
    write_wait_s: int
    exclude: tuple[str, ...]
    watch_backend: str
    poll_interval_ms: int
    delete: bool
    max_delete: int
    max_delete_percent: int
    chmod: str
    io_timeout_s: int
    retry_max_s: int
    max_parallel: int
    sandbox: str
    ssh_key_file: Path
    ssh_known_hosts_file: Path
    ssh_host_key_policy: str
    ssh_connect_timeout_s: int
    resolve_interval_s: int
    http_addr: tuple[str, int] | None
    unhealthy_after_s: int
    log_format: str
    log_level: str
    shutdown_grace_s: int
    runtime_dir: Path | None
    hook_command: tuple[str, ...]
    hook_timeout_s: int
    hook_env: tuple[str, ...]
    hook_max_paths: int
    webhook_url: str
    webhook_secret_file: Path | None
    webhook_max_bytes: int
    progress_interval_s: int
    bwlimit: str
    resume: bool


assert [f.name for f in fields(Config)] == [s.attr for s in SETTINGS], "Config must follow SETTINGS"


def _show(value: str) -> str:
    """The value as shown in a message: one line, printable, bytes that are not UTF-8 as \\xNN."""
    text = value if len(value) <= 200 else value[:200] + "..."
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return '"' + text + '"'


def invalid(name: str, value: str | None, must: str) -> ConfigError:
    """``invalid NAME="value": must ...``; ``must`` is the phrase after "must" (or a full "must ..." text)."""
    shown = "" if value is None else "=" + _show(value)
    tail = must if must.startswith("must ") else f"must be {must}"
    tail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in tail)  # one line, whatever was quoted
    return ConfigError(f"invalid {name}{shown}: {tail}")


def _unknown(names: Iterator[str] | list[str]) -> list[str]:
    return sorted({n for n in names if n.startswith(PREFIX) and n not in _BY_NAME and n not in ENTRYPOINT_ONLY})


def _unknown_names(names: Iterator[str] | list[str]) -> list[str]:
    known = list(_BY_NAME) + list(ENTRYPOINT_ONLY)
    warnings = []
    for name in _unknown(names):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"unknown setting {name} is ignored{hint}")
    return warnings


def _missing_hint(name: str, unknown: list[str]) -> str:
    """For a required setting that is not set: the unknown ``SYNC_*`` name that is closest to it, if any."""
    close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6)
    return f" ({close[0]} is set: did you mean {name}?)" if close else ""


def load(
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, list[str]]:
    """Read and validate every setting.

    Args:
        overrides: values from command-line flags, keyed by variable name; they win over everything.
        environ: the environment to read (default: ``os.environ``).

    Returns:
        The config and a list of warnings (unknown ``SYNC_*`` names with the closest known one).

    Raises:
        ConfigError: a value is missing or invalid, or the ``.env`` file named cannot be read.

    Example:
        >>> cfg, _ = load(environ={"SYNC_SOURCE": "/srv", "SYNC_TARGETS": "ssh://u@h/x", "SYNC_ENV_FILE": ""})
        >>> cfg.quiet_ms, cfg.targets[0].name
        (20, 'ssh://u@h:22/x')
    """
    env = dict(os.environ if environ is None else environ)
    flags = dict(overrides or {})
    env_file_text = flags.get("SYNC_ENV_FILE", env.get("SYNC_ENV_FILE"))
    file_values: dict[str, str] = {}
    env_file_setting = _BY_NAME["SYNC_ENV_FILE"]
    env_path = env_file_setting.parse(env_file_text if env_file_text is not None else ".env")
    if env_path is not None:
        if env_path.is_file():
            try:
                file_values = {k: v or "" for k, v in dotenv_values(env_path).items()}
            except (OSError, UnicodeDecodeError) as exc:
                raise invalid("SYNC_ENV_FILE", str(env_path), f"a readable .env file ({exc})") from None
        elif env_file_text is not None and env_file_text.strip():
            raise invalid("SYNC_ENV_FILE", env_file_text, "an existing file, or empty to read none")

    names = list(env) + list(file_values)
    warnings = _unknown_names(names)
    try:
        return _values(flags, env, file_values, names), warnings
    except ConfigError as exc:
        exc.warnings = warnings
        raise


def _values(
    flags: Mapping[str, str], env: Mapping[str, str], file_values: Mapping[str, str], names: list[str]
) -> Config:
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in flags:
            text: str | None = flags[setting.name]
        elif setting.name in env:
            text = env[setting.name]
        elif setting.name in file_values:
            text = file_values[setting.name]
        else:
            text = setting.default
        if text is None or (setting.default is None and not text.strip()):
            raise invalid(setting.name, None, f"set: {setting.form}{_missing_hint(setting.name, _unknown(names))}")
        try:
            values[setting.attr] = setting.parse(text)
        except ValueError as exc:
            shown = url_shown(text) if setting.name in _SECRET_VALUES else text
            raise invalid(setting.name, shown, str(exc)) from None
    cfg = Config(**values)
    if cfg.max_delay_ms < cfg.quiet_ms:
        raise invalid("SYNC_MAX_DELAY_MS", str(cfg.max_delay_ms), f"at least SYNC_QUIET_MS ({cfg.quiet_ms})")
    if cfg.mode == "interval" and cfg.full_sync_interval == 0:
        raise invalid("SYNC_FULL_SYNC_INTERVAL", "0", "at least 1 (seconds) when SYNC_MODE=interval")
    if cfg.webhook_secret_file is not None and not cfg.webhook_url:
        raise invalid(
            "SYNC_WEBHOOK_SECRET_FILE", str(cfg.webhook_secret_file), "empty when SYNC_WEBHOOK_URL is (nothing to sign)"
        )
    return cfg
