"""The bad-input catalogue: one table of cases, each run for real; docs/bad-input.md is generated from it.

Kinds of row:

* ``cli``: ``python -m sidecar [args]`` with the row's settings (``SYNC_ENV_FILE=""``); the exit code and
  one exact stderr line (log lines compared without their time stamp and level).
* ``once``: ``python -m sidecar once`` against a real sshd (rrsync-jailed account), JSON logs; the exit
  code and one exact ``error`` (or ``msg``) field of a warning line.
* ``daemon``: the daemon against that sshd, JSON logs; a setup makes the bad input (before the start or
  once it is ready); then either an exit code and message, or: ready, replicating (byte-identical,
  minus the paths that cannot be copied), the message logged exactly ``count`` times.

No row may print a Traceback. A row with ``bug`` is a product problem: strict xfail, the reason says what.
``{name}`` in settings and messages stands for a value of this run (see PLACEHOLDERS).
Regenerate the doc after changing the table: ``.venv/bin/python -m tests.test_bad_input --write-doc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faults.faultlib import as_user
from tests.helpers import REPO, Sidecar, assert_converges, wait_until
from tests.old_rsync import old_rrsync
from tests.sshd import KeyPair, SshServer, free_port, locked_user, target_user

DOC = REPO / "docs" / "bad-input.md"
START, END = "<!-- cases:start -->", "<!-- cases:end -->"

DEEP_TOP = "level000-".ljust(50, "x")  # top directory of the PATH_MAX rows (its subtree is not comparable)

# The settings every cli row starts from (valid), so that the row's own setting is the one refused.
BASE = {
    "SYNC_SOURCE": "{src}",
    "SYNC_TARGETS": "ssh://u@127.0.0.1:1/x",
    "SYNC_SSH_KEY_FILE": "{key}",
    "SYNC_SSH_KNOWN_HOSTS_FILE": "{known_hosts}",
    "SYNC_HTTP_ADDR": "",
}
FORMS = "ssh://user@host[:port]/abs/path, user@host:/abs/path or dns+ssh://user@name[:port]/abs/path"
PLACEHOLDERS = {
    "src": "an existing source directory",
    "key": "a valid private key file (`{key}.pub` its public half)",
    "known_hosts": "an existing known_hosts file",
    "file": "an existing regular file",
    "empty": "an existing empty file",
    "bad_env": "a .env file holding the byte 0xff",
    "only_ssh": "a directory holding only an `ssh` link (no rsync on PATH)",
    "port": "the test sshd's port",
    "user": "the target account (`upsync-test`)",
    "root": "the target account's rrsync jail directory",
    "fp": "the sshd's host key fingerprint (`SHA256:...`)",
    "kh_line": "the sshd's known_hosts line",
    "dead_port": "a local port nobody listens on",
    "other_key": "a key the target does not authorize",
    "bad_key": "a file that looks like a private key but is not one",
    "world_key": "the right key with mode 0644",
    "empty_kh": "an empty known_hosts file",
    "changed_kh": "a known_hosts file pinning another key for the sshd",
    "new_kh": "a known_hosts path that does not exist yet",
    "sealed_key": "a valid key in a directory only root can enter (mode 0700)",
    "uid": "the uid of the account the row runs as",
}


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the operator did, for the doc
    kind: str = "cli"  # cli | once | daemon
    env: Mapping[str, str | None] = field(default_factory=dict)  # None removes a BASE setting
    args: tuple[str, ...] = ()
    base: bool = True  # cli: start from BASE
    code: int | None = 2  # exit code; None: keeps running
    message: str = ""  # exact stderr line (cli), exact log field (once, daemon)
    prefix: bool = False  # message is a prefix (the rest varies)
    lines: int | None = 1  # cli: number of stderr lines
    last: bool = False  # once: the message is in the last warning line
    setup: str = ""  # daemon: a function of SETUPS
    when: str = "after"  # daemon: the setup runs "before" the start, "after" it is ready, or "both"
    count: int = 1  # daemon: exact number of log lines with the message
    mention: str = ""  # daemon: a warning line must contain this
    ignore: tuple[str, ...] = ()  # daemon: paths that are not copied, left out of the comparison
    followup: str = ""  # daemon: a function of FOLLOWUPS, run once the target is identical
    refusal: str = ""  # daemon: refusing at start is accepted too, as exit 2 and a last line starting so
    behaviour: str = ""  # what else is checked, for the doc
    bug: str = ""  # a product problem: strict xfail
    user: str = ""  # cli: run as this account (files made where it can reach them)
    stream: str = "stderr"  # cli: where the message line is (check prints its FAIL lines on stdout)
    target: str = ""  # once, daemon: a target of its own: "locked" account, "no-del" rrsync, "3.2.7" receiver
    logged: str = ""  # daemon: some log line (any level) contains this


def cli(id_: str, input_: str, env: Mapping[str, str | None], message: str, **kw: object) -> Case:
    return Case(id_, input_, "cli", env, message=message, **kw)  # type: ignore[arg-type]


CASES: list[Case] = [
    # ----- settings ------------------------------------------------------------------------------
    cli(
        "nothing-set",
        "no settings at all",
        {},
        "upsync: invalid SYNC_SOURCE: must be set: a file system path",
        base=False,
    ),
    cli(
        "targets-unset",
        "no targets",
        {"SYNC_TARGETS": None},
        "upsync: invalid SYNC_TARGETS: must be set: a comma-separated list of ssh://user@host[:port]/abs/path "
        "(or user@host:/abs/path, dns+ssh://...)",
    ),
    cli(
        "source-empty",
        "empty source",
        {"SYNC_SOURCE": ""},
        "upsync: invalid SYNC_SOURCE: must be set: a file system path",
    ),
    cli(
        "targets-only-commas",
        "targets that are only separators",
        {"SYNC_TARGETS": " , "},
        f'upsync: invalid SYNC_TARGETS=" , ": must list at least one target: {FORMS}',
    ),
    cli(
        "quiet-negative",
        "negative number",
        {"SYNC_QUIET_MS": "-5"},
        'upsync: invalid SYNC_QUIET_MS="-5": must be a whole number from 1 to 10000 (milliseconds)',
    ),
    cli(
        "quiet-float",
        "number in exponent form",
        {"SYNC_QUIET_MS": "1e3"},
        'upsync: invalid SYNC_QUIET_MS="1e3": must be a whole number from 1 to 10000 (milliseconds)',
    ),
    cli(
        "quiet-too-big",
        "number out of range",
        {"SYNC_QUIET_MS": "99999"},
        'upsync: invalid SYNC_QUIET_MS="99999": must be a whole number from 1 to 10000 (milliseconds)',
    ),
    cli(
        "delay-below-quiet",
        "max delay shorter than the quiet window",
        {"SYNC_QUIET_MS": "50", "SYNC_MAX_DELAY_MS": "10"},
        'upsync: invalid SYNC_MAX_DELAY_MS="10": must be at least SYNC_QUIET_MS (50)',
    ),
    cli(
        "mode-unknown",
        "unknown mode",
        {"SYNC_MODE": "daemon"},
        'upsync: invalid SYNC_MODE="daemon": must be one of watch, interval, once',
    ),
    cli(
        "interval-zero",
        "interval mode with no interval",
        {"SYNC_MODE": "interval", "SYNC_FULL_SYNC_INTERVAL": "0"},
        'upsync: invalid SYNC_FULL_SYNC_INTERVAL="0": must be at least 1 (seconds) when SYNC_MODE=interval',
    ),
    cli(
        "bool-bad",
        "boolean neither true nor false",
        {"SYNC_DELETE": "maybe"},
        'upsync: invalid SYNC_DELETE="maybe": must be true or false',
    ),
    cli(
        "max-delete-zero",
        "delete limit 0",
        {"SYNC_MAX_DELETE": "0"},
        'upsync: invalid SYNC_MAX_DELETE="0": must be a whole number from 1 to 100000000 (paths)',
    ),
    cli(
        "backend-unknown",
        "unknown watch backend",
        {"SYNC_WATCH_BACKEND": "fanotify"},
        'upsync: invalid SYNC_WATCH_BACKEND="fanotify": must be one of auto, inotify, poll',
    ),
    cli(
        "http-no-port",
        "listen address without a port",
        {"SYNC_HTTP_ADDR": "localhost"},
        'upsync: invalid SYNC_HTTP_ADDR="localhost": must be host:port (e.g. 127.0.0.1:9110), :port for all '
        "interfaces, or empty to disable",
    ),
    cli(
        "http-port-range",
        "listen port out of range",
        {"SYNC_HTTP_ADDR": ":99999"},
        'upsync: invalid SYNC_HTTP_ADDR=":99999": must be host:port (e.g. 127.0.0.1:9110), :port for all '
        "interfaces, or empty to disable",
    ),
    cli(
        "chmod-bad",
        "chmod rule rsync would refuse",
        {"SYNC_CHMOD": "rwx"},
        'upsync: invalid SYNC_CHMOD="rwx": must be rsync --chmod rules like "D755,F644" or "Du=rwx,go=rx", '
        "or empty to keep the source's modes",
    ),
    cli(
        "exclude-newline",
        "exclude pattern with a newline",
        {"SYNC_EXCLUDE": "a\nb"},
        'upsync: invalid SYNC_EXCLUDE="a\\nb": must be a comma-separated list of rsync exclude patterns '
        '(e.g. *.tmp,/cache/), or empty; "a\\nb" has a newline or NUL',
    ),
    cli(
        "log-level",
        "unknown log level",
        {"SYNC_LOG_LEVEL": "verbose"},
        'upsync: invalid SYNC_LOG_LEVEL="verbose": must be one of debug, info, warning, error',
    ),
    cli(
        "exclude-include-rule",
        "an exclude pattern written as an rsync include rule",
        {"SYNC_EXCLUDE": "/cache/,+ keep"},
        'upsync: invalid SYNC_EXCLUDE="/cache/,+ keep": must be a comma-separated list of rsync exclude patterns '
        '(e.g. *.tmp,/cache/), or empty; "+ keep" has a leading "+ " makes it an include rule',
    ),
    cli(
        "delete-percent-0",
        "relative delete limit 0",
        {"SYNC_MAX_DELETE_PERCENT": "0"},
        'upsync: invalid SYNC_MAX_DELETE_PERCENT="0": must be a whole number from 1 to 100 (percent)',
    ),
    cli(
        "delete-percent-fraction",
        "relative delete limit as a fraction",
        {"SYNC_MAX_DELETE_PERCENT": "0.1"},
        'upsync: invalid SYNC_MAX_DELETE_PERCENT="0.1": must be a whole number from 1 to 100 (percent)',
    ),
    cli(
        "sandbox-bool",
        "sandbox setting given as a boolean",
        {"SYNC_SANDBOX": "true"},
        'upsync: invalid SYNC_SANDBOX="true": must be one of auto, required, off',
    ),
    cli(
        "parallel-negative",
        "negative parallel runs",
        {"SYNC_MAX_PARALLEL": "-1"},
        'upsync: invalid SYNC_MAX_PARALLEL="-1": must be a whole number from 0 to 1024 (rsync runs; 0: eight per '
        "CPU core)",
    ),
    cli(
        "unhealthy-with-unit",
        "unhealthy-after with a unit",
        {"SYNC_UNHEALTHY_AFTER_S": "10m"},
        'upsync: invalid SYNC_UNHEALTHY_AFTER_S="10m": must be a whole number from 0 to 86400 (seconds)',
    ),
    cli(
        "targets-singular",
        "SYNC_TARGET (singular) set, SYNC_TARGETS missing",
        {"SYNC_TARGETS": None, "SYNC_TARGET": "ssh://u@127.0.0.1:1/x"},
        "upsync: invalid SYNC_TARGETS: must be set: a comma-separated list of ssh://user@host[:port]/abs/path "
        "(or user@host:/abs/path, dns+ssh://...) (SYNC_TARGET is set: did you mean SYNC_TARGETS?)",
        lines=2,
        behaviour="the warning about the unknown SYNC_TARGET comes first",
    ),
    cli(
        "approve-not-a-number",
        "approve with a word",
        {},
        "upsync: invalid approve 'lots': must be a whole number of deletes (approve 950)",
        args=("approve", "lots"),
    ),
    cli(
        "approve-no-daemon",
        "approve with no daemon running",
        {},
        "upsync: no running upsync daemon of uid 0 replicates {src} (looked in ",
        args=("approve", "5"),
        code=1,
        prefix=True,
    ),
    cli(
        "status-no-daemon",
        "status with no daemon running",
        {},
        "upsync: no running upsync daemon of uid 0 replicates {src} (looked in ",
        args=("status",),
        code=2,
        prefix=True,
        behaviour="exit 2: a monitoring check reads it as failing",
    ),
    cli(
        "key-dir-unreadable",
        "the key in a directory the sidecar's uid cannot enter (root's, mode 0700)",
        {"SYNC_SSH_KEY_FILE": "{sealed_key}"},
        'upsync: invalid SYNC_SSH_KEY_FILE="{sealed_key}": must be readable by uid {uid} (chown it to that user, '
        "mode 0600)",
        user="upsync-test",
    ),
    cli(
        "key-dir-unreadable-check",
        "check with the key in a directory the sidecar's uid cannot enter",
        {"SYNC_SSH_KEY_FILE": "{sealed_key}"},
        'FAIL ssh key: invalid SYNC_SSH_KEY_FILE="{sealed_key}": must be readable by uid {uid} (chown it to that '
        "user, mode 0600)",
        args=("check",),
        code=1,
        user="upsync-test",
        stream="stdout",
        lines=None,
        behaviour="one FAIL line per problem, then `FAIL targets: not checked: fix the ssh key first`; no traceback",
    ),
    cli(
        "unknown-setting",
        "misspelt setting (with an otherwise failing config, so the run ends)",
        {"SYNC_QUIETMS": "5", "SYNC_SOURCE": "/nonexistent/uploads"},
        "unknown setting SYNC_QUIETMS is ignored; did you mean SYNC_QUIET_MS?",
        lines=2,
        behaviour="a warning, then the run goes on with the default",
    ),
    cli(
        "env-file-missing",
        "named .env file missing",
        {"SYNC_ENV_FILE": "/nonexistent/.env"},
        'upsync: invalid SYNC_ENV_FILE="/nonexistent/.env": must be an existing file, or empty to read none',
    ),
    cli(
        "env-file-not-utf8",
        ".env file that is not UTF-8",
        {"SYNC_ENV_FILE": "{bad_env}"},
        "upsync: invalid SYNC_ENV_FILE=\"{bad_env}\": must be a readable .env file ('utf-8' codec can't decode "
        "byte 0xff in position 18: invalid start byte)",
    ),
    cli(
        "unknown-flag",
        "misspelt flag",
        {},
        "upsync: unknown flag --quiet-msec; did you mean --quiet-ms?",
        args=("--quiet-msec=5",),
    ),
    cli(
        "unknown-flag-space",
        "misspelt flag, value after a space",
        {},
        "upsync: unknown flag --quiet-msec; did you mean --quiet-ms?",
        args=("--quiet-msec", "5"),
    ),
    cli(
        "unknown-command",
        "unknown command",
        {},
        "upsync: invalid command line: argument command: invalid choice: 'start' (choose from 'run', 'once', "
        "'check', 'config', 'health', 'status', 'plan', 'approve', 'keys')",
        args=("start",),
    ),
    # ----- source --------------------------------------------------------------------------------
    cli(
        "source-missing",
        "source does not exist",
        {"SYNC_SOURCE": "/nonexistent/uploads"},
        'upsync: invalid SYNC_SOURCE="/nonexistent/uploads": must be an existing directory (nothing is there: '
        "mount the uploads volume or fix the path)",
    ),
    cli(
        "source-file",
        "source is a file",
        {"SYNC_SOURCE": "{file}"},
        'upsync: invalid SYNC_SOURCE="{file}": must be a directory, not a file',
    ),
    cli(
        "source-missing-not-utf8",
        "missing source whose name is not UTF-8",
        {"SYNC_SOURCE": "/nonexistent/caf\udce9"},
        'upsync: invalid SYNC_SOURCE="/nonexistent/caf\\xe9": must be an existing directory (nothing is there: '
        "mount the uploads volume or fix the path)",
    ),
    # ----- targets -------------------------------------------------------------------------------
    cli(
        "target-no-path",
        "target without a path",
        {"SYNC_TARGETS": "ssh://u@h"},
        f'upsync: invalid SYNC_TARGETS="ssh://u@h": must give a path in "ssh://u@h" ({FORMS})',
    ),
    cli(
        "target-relative",
        "target path not absolute",
        {"SYNC_TARGETS": "u@h:uploads"},
        'upsync: invalid SYNC_TARGETS="u@h:uploads": must use an absolute path in "u@h:uploads" (with an '
        "rrsync-jailed account, / is the jail's root)",
    ),
    cli(
        "target-dotdot",
        "target path with ..",
        {"SYNC_TARGETS": "ssh://u@h/a/../b"},
        'upsync: invalid SYNC_TARGETS="ssh://u@h/a/../b": must not have "..", newlines or NUL in the path of '
        '"ssh://u@h/a/../b"',
    ),
    cli(
        "target-duplicate",
        "one target listed twice in two spellings",
        {"SYNC_TARGETS": "ssh://u@h/x/,u@h:/x"},
        'upsync: invalid SYNC_TARGETS="ssh://u@h/x/,u@h:/x": must not list one target twice ("u@h:/x" repeats '
        '"ssh://u@h/x/")',
    ),
    cli(
        "target-no-user",
        "target without a user",
        {"SYNC_TARGETS": "ssh://h/x"},
        f'upsync: invalid SYNC_TARGETS="ssh://h/x": must name the login user in "ssh://h/x" ({FORMS})',
    ),
    cli(
        "target-port",
        "target port out of range",
        {"SYNC_TARGETS": "ssh://u@h:99999/x"},
        'upsync: invalid SYNC_TARGETS="ssh://u@h:99999/x": must have a port from 1 to 65535 in '
        '"ssh://u@h:99999/x" ("99999" is not one)',
    ),
    cli(
        "target-scheme",
        "unknown scheme",
        {"SYNC_TARGETS": "rsync://u@h/x"},
        f'upsync: invalid SYNC_TARGETS="rsync://u@h/x": must use a known scheme in "rsync://u@h/x" ({FORMS})',
    ),
    cli(
        "target-dash-host",
        "host starting with a dash (ssh option injection)",
        {"SYNC_TARGETS": "ssh://u@-oProxyCommand=x/x"},
        'upsync: invalid SYNC_TARGETS="ssh://u@-oProxyCommand=x/x": must have a valid host name or address in '
        '"ssh://u@-oProxyCommand=x/x" ("-oProxyCommand=x" is not one)',
    ),
    cli(
        "target-dash-user",
        "user starting with a dash",
        {"SYNC_TARGETS": "-oProxyCommand=x@h:/x"},
        'upsync: invalid SYNC_TARGETS="-oProxyCommand=x@h:/x": must have a valid user name in '
        '"-oProxyCommand=x@h:/x" ("-oProxyCommand=x" is not one)',
    ),
    cli(
        "target-newline",
        "newline inside a target",
        {"SYNC_TARGETS": "ssh://u@h/a\nb"},
        'upsync: invalid SYNC_TARGETS="ssh://u@h/a\\nb": must not contain newlines or other control characters',
    ),
    # ----- keys, known_hosts, runtime --------------------------------------------------------------
    cli(
        "key-missing",
        "key file missing",
        {"SYNC_SSH_KEY_FILE": "/nonexistent/id_ed25519"},
        'upsync: invalid SYNC_SSH_KEY_FILE="/nonexistent/id_ed25519": must be an existing private key file '
        "(mount it, or set SYNC_SSH_KEY_FILE to where it is)",
    ),
    cli(
        "key-is-pub",
        "the public key given instead",
        {"SYNC_SSH_KEY_FILE": "{key}.pub"},
        'upsync: invalid SYNC_SSH_KEY_FILE="{key}.pub": must be a private key (this file does not start like '
        "one; did you give the .pub file?)",
    ),
    cli(
        "key-is-dir",
        "key path is a directory",
        {"SYNC_SSH_KEY_FILE": "/tmp"},
        'upsync: invalid SYNC_SSH_KEY_FILE="/tmp": must be a private key file, not a directory',
    ),
    cli(
        "known-hosts-missing",
        "known_hosts file missing",
        {"SYNC_SSH_KNOWN_HOSTS_FILE": "/nonexistent/known_hosts"},
        'upsync: invalid SYNC_SSH_KNOWN_HOSTS_FILE="/nonexistent/known_hosts": must be an existing known_hosts '
        "file with the targets' host keys (ssh-keyscan HOST >> FILE, after checking the fingerprint)",
    ),
    cli(
        "accept-new-unwritable",
        "accept-new with a known_hosts file that cannot be written",
        {"SYNC_SSH_HOST_KEY_POLICY": "accept-new", "SYNC_SSH_KNOWN_HOSTS_FILE": "/proc/nonexistent/known_hosts"},
        'upsync: invalid SYNC_SSH_KNOWN_HOSTS_FILE="/proc/nonexistent/known_hosts": must be writable when '
        "SYNC_SSH_HOST_KEY_POLICY=accept-new (new host keys are written to it)",
    ),
    cli(
        "runtime-dir-missing",
        "runtime directory does not exist",
        {"SYNC_RUNTIME_DIR": "/nonexistent/run"},
        'upsync: invalid SYNC_RUNTIME_DIR="/nonexistent/run": must be',
        prefix=True,
    ),
    cli(
        "no-rsync",
        "rsync not installed",
        {"PATH": "{only_ssh}"},
        "upsync: rsync is not installed or not on PATH (install the rsync package)",
        code=3,
    ),
    # ----- hooks, progress and bandwidth (sidecar.hooks, sidecar.progress) -------------------------------
    cli(
        "hook-unclosed-quote",
        "hook command with an unclosed quote",
        {"SYNC_HOOK_COMMAND": 'purge "all'},
        'upsync: invalid SYNC_HOOK_COMMAND="purge "all": must be a command line (split as a shell would, run '
        "without one: `sh -c '...'` for pipes), or empty (No closing quotation)",
    ),
    cli(
        "hook-not-installed",
        "hook program not on PATH",
        {"SYNC_HOOK_COMMAND": "purge-cdn --all"},
        'upsync: invalid SYNC_HOOK_COMMAND="purge-cdn --all": must be a command whose program exists and can be '
        "run (purge-cdn is not on PATH)",
        behaviour="refused at start (pre-flight)",
    ),
    cli(
        "hook-not-executable",
        "hook program is a file that cannot be run",
        {"SYNC_HOOK_COMMAND": "{file} x"},
        'upsync: invalid SYNC_HOOK_COMMAND="{file} x": must be a command whose program exists and can be run '
        "({file} is not an executable file)",
    ),
    cli(
        "hook-env-own-setting",
        "hook environment naming one of upsync's settings",
        {"SYNC_HOOK_ENV": "CDN_TOKEN,SYNC_SSH_KEY_FILE"},
        'upsync: invalid SYNC_HOOK_ENV="CDN_TOKEN,SYNC_SSH_KEY_FILE": must be a comma-separated list of '
        "environment variable names (not SYNC_* or UPSYNC_*), or empty; SYNC_SSH_KEY_FILE is upsync's own "
        "(settings may name secrets)",
    ),
    cli(
        "hook-env-bad-name",
        "hook environment with a name no variable can have",
        {"SYNC_HOOK_ENV": "CDN-TOKEN"},
        'upsync: invalid SYNC_HOOK_ENV="CDN-TOKEN": must be a comma-separated list of environment variable '
        'names (not SYNC_* or UPSYNC_*), or empty; "CDN-TOKEN" is not a variable name',
    ),
    cli(
        "hook-timeout-zero",
        "hook timeout 0",
        {"SYNC_HOOK_TIMEOUT_S": "0"},
        'upsync: invalid SYNC_HOOK_TIMEOUT_S="0": must be a whole number from 1 to 3600 (seconds)',
    ),
    cli(
        "webhook-scheme",
        "webhook URL that is not http(s)",
        {"SYNC_WEBHOOK_URL": "ftp://hooks.example.com/upsync"},
        'upsync: invalid SYNC_WEBHOOK_URL="ftp://hooks.example.com/…": must be an http:// or https:// URL with a '
        "host and no user:password@, or empty",
        behaviour="the URL's path is not shown (it may hold a token)",
    ),
    cli(
        "webhook-credentials",
        "webhook URL with user:password",
        {"SYNC_WEBHOOK_URL": "https://user:s3cret@hooks.example.com/upsync"},
        'upsync: invalid SYNC_WEBHOOK_URL="https://hooks.example.com/…": must be an http:// or https:// URL with a '
        "host and no user:password@, or empty (put a token in the path or use SYNC_WEBHOOK_SECRET_FILE)",
        behaviour="the password is not shown",
    ),
    cli(
        "webhook-no-host",
        "webhook URL without a host",
        {"SYNC_WEBHOOK_URL": "https:///upsync"},
        'upsync: invalid SYNC_WEBHOOK_URL="(not shown: it may hold a token)": must be an http:// or https:// URL '
        "with a host and no user:password@, or empty",
    ),
    cli(
        "webhook-secret-without-url",
        "webhook secret file but no webhook",
        {"SYNC_WEBHOOK_SECRET_FILE": "{file}"},
        'upsync: invalid SYNC_WEBHOOK_SECRET_FILE="{file}": must be empty when SYNC_WEBHOOK_URL is (nothing to sign)',
    ),
    cli(
        "webhook-secret-missing",
        "webhook secret file missing",
        {"SYNC_WEBHOOK_URL": "https://hooks.example.com/upsync", "SYNC_WEBHOOK_SECRET_FILE": "/nonexistent/secret"},
        'upsync: invalid SYNC_WEBHOOK_SECRET_FILE="/nonexistent/secret": must be an existing file holding the '
        "webhook secret (mount it there)",
        behaviour="refused at start (pre-flight)",
    ),
    cli(
        "webhook-secret-empty",
        "webhook secret file empty",
        {"SYNC_WEBHOOK_URL": "https://hooks.example.com/upsync", "SYNC_WEBHOOK_SECRET_FILE": "{empty}"},
        'upsync: invalid SYNC_WEBHOOK_SECRET_FILE="{empty}": must be a file holding the webhook secret (it is empty)',
    ),
    cli(
        "bwlimit-unit",
        "bandwidth limit with a unit rsync does not take",
        {"SYNC_BWLIMIT": "10MB/s"},
        'upsync: invalid SYNC_BWLIMIT="10MB/s": must be a rate for rsync --bwlimit: a number in KiB/s, or with a '
        "K, M or G suffix (e.g. 20M), 0 for no limit",
    ),
    cli(
        "progress-interval-negative",
        "negative progress interval",
        {"SYNC_PROGRESS_INTERVAL_S": "-1"},
        'upsync: invalid SYNC_PROGRESS_INTERVAL_S="-1": must be a whole number from 0 to 86400 (seconds)',
    ),
    Case(
        "hook-fails",
        "a hook command that fails",
        "once",
        {"SYNC_HOOK_COMMAND": "false"},
        code=0,
        message="hook failed",
        behaviour="the sync succeeds; the failure is logged and counted",
    ),
    Case(
        "webhook-unreachable",
        "a webhook nobody listens on",
        "once",
        {"SYNC_WEBHOOK_URL": "http://127.0.0.1:{dead_port}/hook", "SYNC_SHUTDOWN_GRACE_S": "2"},
        code=0,
        message="webhook failed; retrying",
        behaviour="the sync succeeds; retries end with the shutdown grace",
    ),
    # ----- at run time, against a real sshd --------------------------------------------------------
    Case(
        "wrong-key",
        "a key the target does not authorize",
        "once",
        {"SYNC_SSH_KEY_FILE": "{other_key}"},
        code=1,
        message="{user}@[127.0.0.1]:{port} refused the key {other_key} ({user}@127.0.0.1: Permission denied "
        "(publickey).); the target's sshd log says which of these it is: the key is not in {user}'s "
        'authorized_keys (add \'command="/usr/bin/rrsync -wo DIR",restrict ssh-ed25519 ',
        prefix=True,
    ),
    Case(
        "wrong-user",
        "a login the target does not allow",
        "once",
        {"SYNC_TARGETS": "ssh://nobody@127.0.0.1:{port}/"},
        code=1,
        message="nobody@[127.0.0.1]:{port} refused the key {key} (nobody@127.0.0.1: Permission denied "
        "(publickey).); the target's sshd log says which of these it is: the key is not in nobody's "
        "authorized_keys",
        prefix=True,
    ),
    Case(
        "locked-account",
        "the target account is locked (password field '!', as useradd leaves it)",
        "once",
        code=1,
        target="locked",
        message="upsync-locked@[127.0.0.1]:{port} refused the key {key} (upsync-locked@127.0.0.1: Permission "
        "denied (publickey).); the target's sshd log says which of these it is:",
        prefix=True,
        behaviour="the message goes on to name a locked account (usermod -p '*'), a missing key and bad modes",
    ),
    Case(
        "target-refuses-deletes",
        "the target's rrsync refuses deletes (rrsync -wo -no-del)",
        "once",
        code=1,
        target="no-del",
        message="the target refuses deletes (rrsync -no-del in its authorized_keys command): remove -no-del "
        "there, or set SYNC_DELETE=false here: ",
        prefix=True,
    ),
    Case(
        "old-receiver",
        "a target running Debian 12's own rsync 3.2.7, which rejects --delete-missing-args",
        "daemon",
        code=None,
        target="3.2.7",
        setup="delete_file_and_dir",
        when="both",
        logged="rejects --delete-missing-args (rsync 3.2.x): removals use --delete scoped by filter rules",
        behaviour="deletes of a file and of a directory with files reach the target (through filter rules)",
    ),
    cli(
        "corrupt-key",
        "a key file that only looks like a private key",
        {"SYNC_SSH_KEY_FILE": "{bad_key}"},
        'upsync: invalid SYNC_SSH_KEY_FILE="{bad_key}": must be a private key ssh can load without a passphrase '
        "(Load key it: ",
        prefix=True,
        behaviour="refused at start: ssh-keygen -y cannot derive its public key",
    ),
    Case(
        "world-readable-key",
        "a key readable by others (mode 0644)",
        "once",
        {"SYNC_SSH_KEY_FILE": "{world_key}"},
        code=0,
        message="private key is readable by others; using a private 0600 copy",
        behaviour="the sync succeeds",
    ),
    Case(
        "unknown-host-key",
        "host key not pinned",
        "once",
        {"SYNC_SSH_KNOWN_HOSTS_FILE": "{empty_kh}"},
        code=1,
        message="host key of [127.0.0.1]:{port} is not pinned in {empty_kh}; the server offers ED25519 {fp}; "
        "if that is the server's fingerprint, pin it: echo '{kh_line}' >> {empty_kh} (or set "
        "SYNC_SSH_HOST_KEY_POLICY=accept-new to trust a first key)",
    ),
    Case(
        "changed-host-key",
        "host key changed",
        "once",
        {"SYNC_SSH_KNOWN_HOSTS_FILE": "{changed_kh}"},
        code=1,
        message="host key of [127.0.0.1]:{port} does not match the one pinned in {changed_kh} (it now offers "
        "ED25519 {fp}); if the server was re-keyed on purpose, replace its line in that file",
    ),
    Case(
        "accept-new-first-key",
        "accept-new with no known_hosts file yet",
        "once",
        {"SYNC_SSH_HOST_KEY_POLICY": "accept-new", "SYNC_SSH_KNOWN_HOSTS_FILE": "{new_kh}"},
        code=0,
        message="synced",
        behaviour="the file is created holding the server's key",
    ),
    Case(
        "unreachable",
        "nothing listening on the target port",
        "once",
        {"SYNC_TARGETS": "ssh://{user}@127.0.0.1:{dead_port}/"},
        code=1,
        message="cannot reach [127.0.0.1]:{dead_port}: ssh: connect to host 127.0.0.1 port {dead_port}: "
        "Connection refused",
    ),
    Case(
        "once-says-why",
        "`once` against an unreachable target: its last warning says why it failed",
        "once",
        {"SYNC_TARGETS": "ssh://{user}@127.0.0.1:{dead_port}/"},
        code=1,
        message="cannot reach [127.0.0.1]:{dead_port}",
        prefix=True,
        last=True,
    ),
    Case(
        "target-dir-missing",
        "target directory missing inside the jail",
        "once",
        {"SYNC_TARGETS": "ssh://{user}@127.0.0.1:{port}/no/such/dir"},
        code=1,
        message='rsync: [Receiver] mkdir "{root}/no/such/dir" failed: No such file or directory (2)',
        behaviour="retried with reason=error (the daemon keeps retrying)",
    ),
    Case(
        "source-not-utf8",
        "source directory whose path is not UTF-8",
        "daemon",
        setup="source_not_utf8",
        when="before",
        code=None,
        refusal='upsync: invalid SYNC_SOURCE="',
        behaviour="replicated, or refused at start with exit 2 and one line",
    ),
    Case(
        "source-newline",
        "source directory whose path holds a newline",
        "daemon",
        setup="source_newline",
        when="before",
        code=None,
        behaviour="replicated",
    ),
    # ----- names, created while the daemon runs ------------------------------------------------------
    Case(
        "name-newline", "file name with a newline", "daemon", setup="names_newline", code=None, behaviour="replicated"
    ),
    Case(
        "name-dash",
        "file names that look like rsync options (`-e`, `--delete`, `-rf x.jpg`, `--files-from=x`)",
        "daemon",
        setup="names_dash",
        code=None,
        behaviour="replicated",
    ),
    Case(
        "name-not-utf8",
        "file name that is not UTF-8 (Latin-1 `café`)",
        "daemon",
        setup="names_latin1",
        code=None,
        mention="Unable to decode path",
        behaviour="replicated by the full sync that follows a watcher restart",
    ),
    Case(
        "name-not-utf8-read",
        "that file then read 3 times (as a web server serves it)",
        "daemon",
        setup="names_latin1",
        followup="read_latin1",
        code=None,
        behaviour="no further watcher restart or full sync",
    ),
    Case("name-255", "file name of 255 bytes (ASCII)", "daemon", setup="names_255", code=None, behaviour="replicated"),
    Case(
        "name-255-utf8",
        "file name of 255 bytes (85 three-byte characters)",
        "daemon",
        setup="names_255_utf8",
        code=None,
        behaviour="replicated",
    ),
    Case(
        "name-control",
        "file names with tab, carriage return, escape, backslash, colon, only spaces, trailing space",
        "daemon",
        setup="names_control",
        code=None,
        behaviour="replicated",
    ),
    Case("nest-100", "100 nested directories", "daemon", setup="nest_100", code=None, behaviour="replicated"),
    Case(
        "path-max-moved-in",
        "a directory holding a path longer than PATH_MAX (100 levels of 50 bytes) moved into the source",
        "daemon",
        setup="nest_path_max_moved",
        code=None,
        mention="File name too long",
        ignore=(DEEP_TOP,),
        behaviour="the part within PATH_MAX replicated, the rest reported",
    ),
    Case(
        "path-max-at-start",
        "a path longer than PATH_MAX present at start",
        "daemon",
        setup="nest_path_max",
        when="before",
        code=None,
        mention="File name too long",
        ignore=(DEEP_TOP,),
        behaviour="ready; everything else replicated; the long path reported",
    ),
]


# ----- setups (daemon rows) -----------------------------------------------------------------------


def _make(root: Path, names: list[bytes]) -> None:
    for name in names:
        path = os.path.join(os.fsencode(root), name)
        with open(path, "wb") as fh:
            fh.write(name)


def _nest(root: Path, levels: int, width: int) -> None:
    """``levels`` nested directories of ``width``-byte names with a file at the bottom (dir fds: no PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for i in range(levels):
            name = f"level{i:03d}-".ljust(width, "x") if width > 9 else f"d{i}"
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep")
        os.close(out)
    finally:
        os.close(fd)


def _nest_moved_in(source: Path, workdir: Path) -> None:
    staging = workdir / "staging"
    staging.mkdir()
    _nest(staging, 100, 50)
    os.rename(staging / DEEP_TOP, source / DEEP_TOP)  # one event: the batch walks the directory whole


def _source_not_utf8(source: Path, workdir: Path) -> Path:
    path = os.path.join(os.fsencode(workdir), b"uploads-caf\xe9")
    os.mkdir(path)
    _make(Path(os.fsdecode(path)), [b"seed.txt"])
    return Path(os.fsdecode(path))


def _source_newline(source: Path, workdir: Path) -> Path:
    path = workdir / "uploads\nwith newline"
    path.mkdir()
    (path / "seed.txt").write_text("seed\n")
    return path


def _delete_file_and_dir(source: Path, workdir: Path) -> None:
    """Made before the start, deleted once the daemon is ready: a file, and a directory with files."""
    if not (source / "gone.jpg").exists():
        (source / "gone.jpg").write_text("x")
        (source / "gone-dir").mkdir()
        for i in range(3):
            (source / f"gone-dir/{i}.jpg").write_text(str(i))
        return
    (source / "gone.jpg").unlink()
    shutil.rmtree(source / "gone-dir")


SETUPS: dict[str, Callable[[Path, Path], Path | None]] = {
    "delete_file_and_dir": _delete_file_and_dir,
    "source_not_utf8": _source_not_utf8,
    "source_newline": _source_newline,
    "names_newline": lambda s, _w: _make(s, [b"new\nline.jpg"]),
    "names_dash": lambda s, _w: _make(s, [b"-e", b"--delete", b"-rf x.jpg", b"--files-from=x"]),
    "names_latin1": lambda s, _w: _make(s, [b"caf\xe9.jpg"]),
    "names_255": lambda s, _w: _make(s, [b"x" * 251 + b".jpg"]),
    "names_255_utf8": lambda s, _w: _make(s, [("日" * 85).encode()]),
    "names_control": lambda s, _w: _make(
        s,
        [b"tab\there.jpg", b"cr\rhere.jpg", b"esc\x1b[31m.jpg", b"back\\slash.jpg", b"host:path.jpg", b"   ", b"end "],
    ),
    "nest_100": lambda s, _w: _nest(s, 100, 2),
    "nest_path_max": lambda s, _w: _nest(s, 100, 50),
    "nest_path_max_moved": _nest_moved_in,
}


def _full_syncs(sidecar: Sidecar) -> int:
    return sum(1 for d in _json_logs(sidecar.logs()) if d.get("msg") == "full sync")


def _settled(sidecar: Sidecar, quiet: float = 2.0, timeout: float = 20) -> int:
    """The number of full syncs once none has started for ``quiet`` seconds."""
    seen = [_full_syncs(sidecar), time.monotonic()]

    def still() -> bool:
        now = _full_syncs(sidecar)
        if now != seen[0]:
            seen[:] = [now, time.monotonic()]
        return time.monotonic() - seen[1] >= quiet

    wait_until(still, timeout, "the full syncs to settle", interval=0.1)
    return int(seen[0])


def _read_latin1(source: Path, target: Path, sidecar: Sidecar) -> None:
    before = _settled(sidecar)
    path = os.path.join(os.fsencode(source), b"caf\xe9.jpg")
    for _ in range(3):
        with open(path, "rb") as fh:
            fh.read()
        time.sleep(1)  # reads spaced like requests; nothing is awaited here
    after = _settled(sidecar)
    assert after == before, f"{after - before} full syncs caused by 3 reads"


FOLLOWUPS: dict[str, Callable[[Path, Path, Sidecar], None]] = {"read_latin1": _read_latin1}


# ----- running the rows ---------------------------------------------------------------------------

_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?:DEBUG|INFO|WARNING|ERROR)\s+")


def _fill(template: str, ctx: Mapping[str, str]) -> str:
    return template.format(**ctx)


def _matches(found: str, expected: str, prefix: bool) -> bool:
    return found.startswith(expected) if prefix else found == expected


def _cli_context(tmp: Path) -> dict[str, str]:
    src = tmp / "src"
    src.mkdir()
    key = KeyPair(tmp, "key")
    known = tmp / "known_hosts"
    known.write_text("[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHgUu3q35jEzRS6nU1jPtF6X3gYJtY6x6ZCWLWST4AQ0\n")
    regular = tmp / "a-file"
    regular.write_text("x")
    (tmp / "empty-file").write_text("")
    bad_env = tmp / "bad.env"
    bad_env.write_bytes(b"SYNC_QUIET_MS=5\nX=\xff\n")
    only_ssh = tmp / "only-ssh"
    only_ssh.mkdir()
    (only_ssh / "ssh").symlink_to(shutil.which("ssh") or "/usr/bin/ssh")
    bad_key = tmp / "corrupt-key"
    bad_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
    bad_key.chmod(0o600)
    sealed = tmp / "sealed"
    sealed.mkdir(mode=0o700)  # root's: no other uid can enter
    sealed_key = KeyPair(sealed, "key")
    return {
        "sealed_key": str(sealed_key.private),
        "bad_key": str(bad_key),
        "src": str(src),
        "key": str(key.private),
        "known_hosts": str(known),
        "file": str(regular),
        "empty": str(tmp / "empty-file"),
        "bad_env": str(bad_env),
        "only_ssh": str(only_ssh),
    }


def run_cli(case: Case, tmp: Path) -> None:
    prefix: list[str] = []
    if case.user:
        # Another uid: the row's files must be where it can reach them (pytest's tmp_path is root's 0700).
        tmp = Path(tempfile.mkdtemp(prefix="upsync-badinput-"))
        tmp.chmod(0o755)
        prefix = as_user(target_user() if case.user == "upsync-test" else case.user)
    try:
        _run_cli(case, tmp, prefix)
    finally:
        if case.user:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_cli(case: Case, tmp: Path, prefix: list[str]) -> None:
    ctx = _cli_context(tmp)
    if prefix:
        for name in ("src", "key", "known_hosts"):
            shutil.chown(ctx[name], target_user(), target_user())
    ctx["uid"] = str(pwd.getpwnam(target_user()).pw_uid if prefix else os.getuid())
    env = {"PATH": os.environ["PATH"], "SYNC_ENV_FILE": ""}
    if case.base:
        env.update({k: _fill(v, ctx) for k, v in BASE.items()})
    for name, value in case.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = _fill(value, ctx)
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "sidecar", *case.args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=30,
        check=False,
    )
    out = proc.stdout if case.stream == "stdout" else proc.stderr
    lines = [_STAMP.sub("", ln) for ln in out.splitlines()]
    expected = _fill(case.message, ctx)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == case.code, proc.stderr + proc.stdout
    assert any(_matches(ln, expected, case.prefix) for ln in lines), f"{expected!r} not in {lines}"
    if case.lines is not None:
        assert len(lines) == case.lines, lines


def _fingerprint(public: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(public)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def _runtime_context(sshd: SshServer, client_key: KeyPair, workdir: Path) -> dict[str, str]:
    other = KeyPair(workdir, "not-authorized")
    world = workdir / "world-readable-key"
    shutil.copy(client_key.private, world)
    world.chmod(0o644)
    empty = workdir / "empty_known_hosts"
    empty.write_text("")
    changed = workdir / "changed_known_hosts"
    kind, blob = KeyPair(workdir, "another-host").public_text.split()[:2]
    changed.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    return {
        "port": str(sshd.port),
        "user": sshd.user,
        "root": str(sshd.root),
        "key": str(client_key.private),
        "fp": _fingerprint(sshd.host_key.public),
        "kh_line": sshd.known_hosts_line(),
        "dead_port": str(free_port()),
        "other_key": str(other.private),
        "world_key": str(world),
        "empty_kh": str(empty),
        "changed_kh": str(changed),
        "new_kh": str(workdir / "known_hosts-to-be-created"),
    }


def _json_logs(text: str) -> list[dict]:
    docs = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                docs.append(json.loads(line))
            except ValueError:
                continue
    return docs


def _sidecar(source: Path, sshd: SshServer, key: KeyPair, workdir: Path, env: dict[str, str]) -> Sidecar:
    runtime = workdir / "runtime"  # not /tmp: a daemon killed by the sidecars fixture leaves it behind
    runtime.mkdir(exist_ok=True)
    env = {"SYNC_LOG_FORMAT": "json", "SYNC_RETRY_MAX_S": "1", "SYNC_RUNTIME_DIR": str(runtime), **env}
    if "SYNC_TARGETS" in env:  # a target of its own: the helper then needs the known_hosts file named
        env.setdefault("SYNC_SSH_KNOWN_HOSTS_FILE", str(sshd.known_hosts))
        return Sidecar(source, env.pop("SYNC_TARGETS"), key, workdir, **env)
    return Sidecar(source, [sshd], key, workdir, **env)


@contextlib.contextmanager
def _target(case: Case, sshd: SshServer, client_key: KeyPair, workdir: Path) -> Iterator[SshServer]:
    """The row's target: the shared sshd, or one made for the row (and what it changes, undone after)."""
    if not case.target:
        yield sshd
        return
    # "locked": what `useradd` leaves, "!" in the password field; sshd without PAM then refuses even keys.
    user = locked_user() if case.target == "locked" else None
    command = {"no-del": "/usr/bin/rrsync -wo -no-del", "3.2.7": f"{old_rrsync()} -wo"}.get(
        case.target, "/usr/bin/rrsync -wo"
    )
    own = SshServer(workdir / f"sshd-{case.target}", client_key, sshd.host_key, rrsync_cmd=command, user=user)
    own.start()
    try:
        yield own
    finally:
        own.stop()


def run_once(case: Case, source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    with _target(case, sshd, client_key, workdir) as target:
        _run_once(case, source, target, client_key, workdir)


def _run_once(case: Case, source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    ctx = _runtime_context(sshd, client_key, workdir)
    env = {k: _fill(v, ctx) for k, v in case.env.items() if v is not None}
    proc = _sidecar(source, sshd, client_key, workdir, env).run("once", timeout=90)
    expected = _fill(case.message, ctx)
    docs = _json_logs(proc.stderr)
    warnings = [d for d in docs if d.get("level") in ("warning", "error")]
    pool = warnings[-1:] if case.last else docs
    fields = [str(d[k]) for d in pool for k in ("error", "msg") if k in d]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.code, proc.stderr
    assert any(_matches(f, expected, case.prefix) for f in fields), f"{expected!r} not in {fields}"
    if case.id == "accept-new-first-key":
        assert Path(ctx["new_kh"]).read_text().strip() == ctx["kh_line"]


def _synced(sidecar: Sidecar) -> bool:
    """/readyz 200 with every target synced (at start-up it can say 200 before any target exists)."""
    code, doc = sidecar.readyz()
    targets = doc.get("targets") or []
    return code == 200 and bool(targets) and all(t.get("state") == "ok" for t in targets)


def run_daemon(
    case: Case, source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar]
) -> None:
    with _target(case, sshd, client_key, workdir) as target:
        _run_daemon(case, source, target, client_key, workdir, sidecars)


def _run_daemon(
    case: Case, source: Path, sshd: SshServer, client_key: KeyPair, workdir: Path, sidecars: list[Sidecar]
) -> None:
    setup = SETUPS[case.setup]
    if case.when in ("before", "both"):
        source = setup(source, workdir) or source
    sidecar = _sidecar(source, sshd, client_key, workdir, {})
    sidecars.append(sidecar)  # killed after the test whatever happens
    sidecar.start()
    assert sidecar.proc is not None
    proc = sidecar.proc
    wait_until(lambda: proc.poll() is not None or _synced(sidecar), 15, "ready (or a refusal)")
    if proc.poll() is not None:
        out = sidecar.logs()
        assert case.refusal, f"exited {proc.returncode}:\n{out}"
        assert proc.returncode == 2 and "Traceback" not in out, out
        assert out.splitlines()[-1].startswith(case.refusal), out
        return
    if case.when in ("after", "both"):
        setup(source, workdir)
    (source / "after.jpg").write_text("replication goes on")
    assert_converges(source, sshd.root, 25, ignore=case.ignore)
    if case.followup:
        FOLLOWUPS[case.followup](source, sshd.root, sidecar)
    logs = sidecar.logs()
    docs = _json_logs(logs)
    if case.message:
        matching = [d for d in docs if case.message in (d.get("msg"), d.get("error"))]
        assert len(matching) == case.count, f"{case.message!r} logged {len(matching)} times, not {case.count}"
    if case.mention:
        assert any(case.mention in json.dumps(d) for d in docs if d.get("level") in ("warning", "error"))
    if case.logged:
        assert any(case.logged in json.dumps(d) for d in docs), f"{case.logged!r} not logged"
    assert "Traceback" not in logs
    sidecar.check_alive()


def _param(case: Case) -> object:
    marks: list[pytest.MarkDecorator] = []
    if case.kind != "cli":
        marks.append(pytest.mark.integration)
        marks.append(pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ssh target account)"))
    if case.bug:
        marks.append(pytest.mark.xfail(strict=True, reason=case.bug))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if case.kind == "cli":
        run_cli(case, tmp_path)
        return
    fixtures = [request.getfixturevalue(n) for n in ("source", "sshd", "client_key", "workdir")]
    if case.kind == "once":
        run_once(case, *fixtures)
    else:
        run_daemon(case, *fixtures, request.getfixturevalue("sidecars"))


# ----- the doc ------------------------------------------------------------------------------------


def _show(value: str) -> str:
    """A setting's value as one printable line (newlines, bytes that are not UTF-8 escaped)."""
    raw = value.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _code(text: str) -> str:
    return "`" + _show(text).replace("|", "\\|") + "`" if text else ""


def render() -> str:
    """The table of docs/bad-input.md."""
    out = [
        "| # | Input | Settings / command | Run as | Exit | Exact message (or behaviour) | Status |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, c in enumerate(CASES, 1):
        settings = [f"{k}={v}" if v is not None else f"{k} unset" for k, v in c.env.items()]
        if not c.base and c.kind == "cli" and not settings:
            settings = ["(none)"]
        what = " ".join(_code(s) for s in settings)
        if c.args:
            what += (" " if what else "") + _code("python -m sidecar " + " ".join(c.args))
        if c.setup:
            what += (
                " " if what else ""
            ) + f"setup `{c.setup}` ({ {'before': 'before start', 'after': 'while running'}.get(c.when, 'both') })"
        run = {"cli": "CLI", "once": "`once` vs sshd", "daemon": "daemon vs sshd"}[c.kind]
        code = "— (runs)" if c.code is None else str(c.code)
        msg = _code(c.message)
        if msg and c.prefix:
            msg += " (prefix)"
        if msg and c.kind == "cli" and c.lines and c.lines > 1:
            msg += f" ({c.lines} lines)"
        if msg and c.kind == "daemon":
            msg += f" logged {c.count} time(s)"
        if c.mention:
            msg += f"{'; ' if msg else ''}a warning mentions {_code(c.mention)}"
        if c.behaviour:
            msg += ("; " if msg else "") + c.behaviour
        status = f"**BUG** (xfail): {c.bug.replace('|', '/')}" if c.bug else "ok"
        out.append(f"| {n} | {c.input} | {what} | {run} | {code} | {msg} | {status} |")
    return "\n".join(out) + "\n"


def test_doc_is_generated_from_the_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert START in text and END in text, f"{DOC} lacks the {START} / {END} markers"
    current = text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert current == render(), f"{DOC} is stale: run .venv/bin/python -m tests.test_bad_input --write-doc"


def test_table_is_well_formed() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 25
    for c in CASES:
        assert c.kind in ("cli", "once", "daemon") and c.when in ("before", "after", "both")
        assert not c.setup or c.setup in SETUPS
        assert not c.followup or c.followup in FOLLOWUPS
        assert c.message or c.behaviour, c.id


def write_doc() -> None:
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{START}\n{render()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-doc"]:
        write_doc()
    else:
        sys.stdout.write(render())
