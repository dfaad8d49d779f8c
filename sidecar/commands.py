"""The operator's commands against a running daemon or the targets: ``status``, ``approve``, ``plan``.

``status`` and ``approve`` talk to the daemon over its control socket (:mod:`sidecar.control`); ``plan``
needs no daemon: it makes its own connections and runs a dry run of a full sync to each target.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from .config import Config
from .control import ControlError, find_daemon, request
from .daemon import Runtime, make_sandbox, resolve
from .filters import Excludes
from .guard import SourceGuard
from .policy import DeleteLimits, may_delete
from .rsync import Rsync
from .sandbox import SandboxError
from .scan import scan_tree
from .targets import Target
from .transport import TransferError, Transport

__all__ = ["approve", "plan", "status"]

# status: the monitoring-check convention (Nagios): 0 OK, 1 WARNING, 2 CRITICAL.
STATUS_OK, STATUS_DEGRADED, STATUS_FAILING = 0, 1, 2
# plan: how many paths of each kind are listed (the counts are always complete).
PLAN_SHOWN = 20


def _socket(cfg: Config) -> Path:
    base = Path(str(cfg.runtime_dir) if cfg.runtime_dir else tempfile.gettempdir())
    return find_daemon(base, os.path.realpath(cfg.source))


def _age(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def status_lines(doc: dict[str, Any]) -> list[str]:
    """One line per target, then what makes the daemon unhealthy (the text ``status`` prints)."""
    lines = []
    for t in doc.get("targets", []):
        line = (
            f"{t['target']}: {t['state']}, last success {_age(t.get('last_success'))}, pending {t['pending']}"
            f"{' + full sync' if t.get('full_sync_pending') else ''}, p95 {_ms(t.get('latency_p95_s'))}, "
            f"delete guard {'TRIPPED' if t.get('delete_guard') else 'off'}"
        )
        if progress := t.get("progress"):  # a full sync runs (sidecar.progress)
            done = "?" if progress.get("percent") is None else f"{progress['percent']}%"
            eta = "" if progress.get("eta_s") is None else f", eta {progress['eta_s']} s"
            line += f", full sync {done} ({progress['files_sent']} files sent{eta})"
        if t.get("message"):
            line += f" — {t['message']}"
        lines.append(line)
    if not doc.get("targets"):
        lines.append(f"no targets{': ' + doc['note'] if doc.get('note') else ''}")
    if doc.get("message"):
        lines.append(f"source: {doc['message']}")
    for name, why in (doc.get("unhealthy") or {}).items():
        lines.append(f"unhealthy: {name}: {why}")
    return lines


def status_code(doc: dict[str, Any]) -> int:
    """0 ready, 1 degraded (not ready: starting, failing briefly, delete guard), 2 failing (unhealthy)."""
    if not doc.get("alive", False):
        return STATUS_FAILING
    return STATUS_OK if doc.get("ready") else STATUS_DEGRADED


def status(cfg: Config, as_json: bool, out: TextIO = sys.stdout) -> int:
    try:
        doc = request(_socket(cfg), {"cmd": "status"})
    except ControlError as exc:
        print(f"upsync: {exc}", file=sys.stderr)
        return STATUS_FAILING
    if as_json:
        out.write(json.dumps(doc, indent=1, default=str) + "\n")
    else:
        out.write("\n".join(status_lines(doc)) + "\n")
    return status_code(doc)


def approve(cfg: Config, deletes: int, target: str | None, out: TextIO = sys.stdout) -> int:
    try:
        answer = request(_socket(cfg), {"cmd": "approve", "deletes": deletes, "target": target})
    except ControlError as exc:
        print(f"upsync: {exc}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"upsync: {answer.get('error')}", file=sys.stderr)
        return 1
    out.write(
        f"approved: the next full sync of {', '.join(answer['targets'])} may delete up to {deletes} paths "
        "(once); it starts now — follow it with `python -m sidecar status`\n"
    )
    return 0


def _plan_target(cfg: Config, runtime: Runtime, target: Target, root: str, excludes: Excludes) -> dict[str, Any]:
    sandbox = None
    try:
        sandbox = make_sandbox(cfg, root, runtime)
    except SandboxError:
        sandbox = None  # plan reads like a full sync; SYNC_SANDBOX=required is enforced by the daemon
    link = runtime.link(cfg, target)
    try:
        confine = sandbox.confinement if sandbox else None
        rsync = Rsync(root, target.rsync_dest(), link.rsync_shell(), cfg.chmod, excludes, cfg.io_timeout_s, confine)
        scan = scan_tree(root, excludes)
        stats, sent, deleted = Transport(target, link, rsync, runtime.dir).preview_full(scan)
    finally:
        link.close()
        if sandbox:
            sandbox.close()
    holds = max(0, stats.total - stats.created + stats.deleted)  # what the target holds now
    verdict = may_delete(
        stats.deleted,
        max(holds, stats.total),  # as the daemon decides (see policy.may_delete)
        DeleteLimits(cfg.max_delete, cfg.max_delete_percent),
        what="a full sync",
        source_empty=SourceGuard(root).is_empty(),
    )
    return {
        "target": target.name,
        "send_files": stats.files,
        "send_bytes": stats.bytes,
        "delete": stats.deleted,
        "target_holds": holds,
        "guard_allows": verdict.allowed or not cfg.delete,
        "guard": verdict.why,
        "first_sends": sent[:PLAN_SHOWN],
        "first_deletes": deleted[:PLAN_SHOWN],
        "kept_out": scan.unreadable,
        "retracted": [p for p, _ in scan.retract],
    }


def plan(cfg: Config, as_json: bool, out: TextIO = sys.stdout) -> int:
    """A dry run of a full sync to every target: counts and the first paths. 0 when every target answered."""
    root = os.path.realpath(cfg.source)
    excludes = Excludes(cfg.exclude)
    runtime = Runtime(cfg)
    plans, ok = [], True
    try:
        for spec in cfg.targets:
            try:
                concrete = resolve(spec)
            except OSError as exc:
                plans.append({"target": spec.name, "error": f"cannot resolve {spec.host}: {exc}"})
                ok = False
                continue
            for target in concrete:
                try:
                    plans.append(_plan_target(cfg, runtime, target, root, excludes))
                except TransferError as exc:
                    plans.append({"target": target.name, "error": str(exc)})
                    ok = False
    finally:
        runtime.close()
    if as_json:
        out.write(json.dumps({"deletes_enabled": cfg.delete, "targets": plans}, indent=1) + "\n")
        return 0 if ok else 1
    for p in plans:
        if "error" in p:
            out.write(f"{p['target']}: FAILED: {p['error']}\n")
            continue
        share = f"{p['delete'] * 100 / p['target_holds']:.0f}%" if p["target_holds"] else "-"
        out.write(
            f"{p['target']}: would send {p['send_files']} files ({p['send_bytes']} bytes) and delete {p['delete']} "
            f"paths (of {p['target_holds']} on the target: {share})"
            f"{'' if cfg.delete else ' — deletes are off (SYNC_DELETE=false)'}\n"
        )
        for path in p["first_sends"]:
            out.write(f"  send   {path}\n")
        for path in p["first_deletes"]:
            out.write(f"  delete {path}\n")
        more = p["delete"] - len(p["first_deletes"])
        if more > 0:
            out.write(f"  ... and {more} more to delete\n")
        for path in p["kept_out"]:
            out.write(f"  kept out (unreadable) {path}\n")
        if cfg.delete and not p["guard_allows"]:
            out.write(f"  the delete guard refuses this: {p['guard']}\n")
    return 0 if ok else 1
