"""Command line: ``python -m sidecar [run|once|check|config] [--flag value ...]``.

Every setting is a flag too (``SYNC_QUIET_MS`` <-> ``--quiet-ms``); a flag wins over the environment.

Exit codes: 0 success; 1 a sync or check failed (``once``, ``check``) or watching became impossible;
2 invalid configuration (one line says which setting and what it must be); 3 this machine lacks
rsync or ssh.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__, logs
from .config import SETTINGS, ConfigError, load
from .docgen import env_example, markdown_table

__all__ = ["EXIT_CONFIG", "EXIT_ENVIRONMENT", "EXIT_FAILED", "cli", "main"]

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ENVIRONMENT = 3

COMMANDS = {
    "run": "watch and replicate (SYNC_MODE decides how); the default",
    "once": "one full sync to every target, then exit with its status",
    "check": "check the config, the source, the key and every target (connect, write a probe); exit 0/1",
    "config": "print the settings table (--markdown) or .env.example (--env-example)",
    "health": "ask a running daemon's /healthz (or /readyz with --ready); exit 0 if it answers 200 (HEALTHCHECK)",
    "status": "one line per target from the running daemon (--json for all of it); exit 0 ok, 1 degraded, 2 failing",
    "plan": "what a full sync would send and delete on each target now (a dry run; nothing changes)",
    "approve": "approve N: let the running daemon's next full sync delete up to N paths, once (--only TARGET for one)",
    "keys": "make the deployment's ssh keys in DIR and say how to load them (python -m sidecar keys --help)",
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other bad input
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sidecar",
        description="upsync: replicate a directory to ssh targets as it changes (watchfiles + rsync).",
        epilog="commands: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()),
    )
    parser.add_argument("command", nargs="?", default="run", choices=list(COMMANDS), help="what to do (default run)")
    parser.add_argument("count", nargs="?", default=None, help="approve: how many deletes")
    parser.add_argument("--version", action="version", version=f"upsync {__version__}")
    parser.add_argument("--markdown", action="store_true", help="config: print the README settings table")
    parser.add_argument("--env-example", action="store_true", help="config: print .env.example")
    parser.add_argument("--ready", action="store_true", help="health: ask /readyz instead of /healthz")
    parser.add_argument("--json", action="store_true", help="status, plan: print JSON")
    parser.add_argument("--only", default=None, metavar="TARGET", help="approve: only this target (as status names it)")
    group = parser.add_argument_group("settings (each also an environment variable)")
    for s in SETTINGS:
        group.add_argument(s.flag, dest=s.name, metavar="VALUE", default=None, help=f"{s.name}")
    return parser


def _health(addr: tuple[str, int] | None, path: str) -> int:
    """Exit 0 if the daemon's endpoint answers 200: the image's HEALTHCHECK, with no curl needed."""
    import urllib.error
    import urllib.request

    if addr is None:
        return _fail(EXIT_CONFIG, "SYNC_HTTP_ADDR is empty: the health endpoint is disabled")
    host = "127.0.0.1" if addr[0] in ("0.0.0.0", "::", "") else addr[0]
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{addr[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 0 if resp.status == 200 else EXIT_FAILED
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace").strip(), file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        return _fail(EXIT_FAILED, f"{url}: {exc}")


def _fail(code: int, message: str) -> int:
    print(f"upsync: {message}", file=sys.stderr)
    return code


def cli(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (tests call this directly).

    Example:
        >>> cli(["config", "--markdown"]) == 0  # doctest: +ELLIPSIS
        | Variable | ...
        True
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:  # its own arguments (DIR, owners), none of the daemon's settings
        from .keys import main as keys_main

        return keys_main(argv[1:])
    known = {opt for action in parser._actions for opt in action.option_strings}
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (python -m sidecar --help lists them)"
            return _fail(EXIT_CONFIG, f"unknown flag {name}{hint}")
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(EXIT_CONFIG, f"invalid command line: {exc}")
    if args.command == "keys":  # reached only with daemon flags before it
        return _fail(EXIT_CONFIG, "invalid command line: keys comes first (python -m sidecar keys DIR [--flags])")
    if args.command == "config":
        sys.stdout.write(env_example() if args.env_example else markdown_table())
        return 0
    if args.count is not None and args.command != "approve":
        return _fail(EXIT_CONFIG, f"invalid command line: {args.command} takes no argument ({args.count!r})")
    if args.command == "approve" and not (args.count or "").isdigit():
        return _fail(
            EXIT_CONFIG, f"invalid approve {args.count or ''!r}: must be a whole number of deletes (approve 950)"
        )
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name) is not None}
    if args.command == "once":
        overrides["SYNC_MODE"] = "once"
    try:
        cfg, warnings = load(overrides)
    except ConfigError as exc:
        for warning in exc.warnings:  # the hint for a typo matters most when the config fails
            print(f"upsync: {warning}", file=sys.stderr)
        return _fail(EXIT_CONFIG, str(exc))
    if args.command == "health":
        return _health(cfg.http_addr, "/readyz" if args.ready else "/healthz")
    logs.setup(cfg.log_format, cfg.log_level)
    log = logs.get("cli")
    for warning in warnings:
        log.warning(warning)
    for program, package in (("rsync", "rsync"), ("ssh", "openssh-client")):
        if shutil.which(program) is None:
            return _fail(EXIT_ENVIRONMENT, f"{program} is not installed or not on PATH (install the {package} package)")
    from . import commands
    from .check import preflight, run_checks
    from .sandbox import SandboxError

    if args.command == "check":
        return run_checks(cfg)
    if args.command == "status":
        return commands.status(cfg, args.json)
    if args.command == "approve":
        return commands.approve(cfg, int(args.count), args.only)
    try:
        preflight(cfg)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    if args.command == "plan":
        return commands.plan(cfg, args.json)
    from .daemon import Daemon

    try:
        daemon = Daemon(cfg)
    except SandboxError as exc:
        return _fail(EXIT_ENVIRONMENT, f"SYNC_SANDBOX=required, but {exc}; or set SYNC_SANDBOX=auto")
    except OSError as exc:
        return _fail(EXIT_ENVIRONMENT, f"cannot set up the runtime directory: {exc} (check SYNC_RUNTIME_DIR)")
    try:
        return daemon.run()
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli())
