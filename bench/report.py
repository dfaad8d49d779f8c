"""Machine info, the results table (with ratios), the targets verdict, JSON files and the chart."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["chart", "fanout_chart", "fanout_table", "machine_info", "table", "targets", "write_json"]

REPO = Path(__file__).resolve().parent.parent
ORDER = ["sidecar", "lsyncd", "lsyncd_d15", "lsyncd_nomux", "loop", "floor", "floor_k"]
W1_ONLY = ("lsyncd_d15", "lsyncd_nomux")  # measured on the single-file workload only
LABELS = {
    "sidecar": "sidecar",
    "lsyncd": "lsyncd d=0",
    "lsyncd_d15": "lsyncd d=15",
    "lsyncd_nomux": "lsyncd d=0 no mux",
    "loop": "full-tree loop",
    "floor": "floor",
    "floor_k": "floor, k at once",  # W6: at most as many rsyncs at once as the machine has cores
}


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "sidecar"])
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "rsync": _first_line(["rsync", "--version"]),
        "ssh": _first_line(["ssh", "-V"]),
        "lsyncd": _first_line(["lsyncd", "--version"]),
        "inotifywait": _first_line(["inotifywait", "--help"]),
        "sidecar_commit": commit + (" (sidecar/ modified)" if dirty else ""),
        "fs_inotify_max_queued_events": Path("/proc/sys/fs/inotify/max_queued_events").read_text().strip(),
    }


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.system()
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)', text, re.M)
    return m.group(1) if m else platform.system()


# ----- table ---------------------------------------------------------------------------------------


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _num(v: Any) -> float | None:
    if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _fmt(v: Any, digits: int = 1) -> str:
    n = _num(v)
    if n is None:
        return "-" if v is None else str(v)
    return f"{n:,.{digits}f}"


# (label, getter(results, tool) -> value, digits, compare with ratios?)
Row = tuple[str, Callable[[dict[str, Any], str], Any], int, bool]


def _w1(key: str) -> Callable[[dict[str, Any], str], Any]:
    def get(r: dict[str, Any], t: str) -> Any:
        if t in W1_ONLY:
            # "lsyncd_default": where results before the no-mux row kept lsyncd d=15
            return _get(r, "w1_only", t, "w1", key) or _get(r, "lsyncd_default", "w1", key)
        return _get(r, "empty", t, "w1", key)

    return get


def _checks(r: dict[str, Any], t: str) -> str | None:
    parts = []
    for where, names in (("empty", ("w1_check", "w2_check")), ("big", ("w3_check",))):
        for name in names:
            c = _get(r, where, t, name)
            if c is not None:
                parts.append(c)
    if t in W1_ONLY and (c := _get(r, "w1_only", t, "check") or _get(r, "lsyncd_default", "check")) is not None:
        parts.append(c)
    for cell in (_get(r, "fanout", "cells", t) or {}).values():
        parts += [cell[k] for k in ("single_check", "burst_check") if k in cell]
    if not parts:
        return None
    bad = [c for c in parts if not c.get("ok")]
    if bad:
        return "FAIL(" + ",".join(str(c.get("differences")) for c in bad) + " diffs)"
    return f"ok ({len(parts)}/{len(parts)})"


def rows(r: dict[str, Any]) -> list[Row]:
    sz = r.get("sizes", {})
    burst = f"{sz.get('burst_files', 0):,} x {sz.get('burst_size', 0) // 1024} KB / {sz.get('burst_dirs', 0)} dirs"
    big = f"{sz.get('big_files', 0):,} files"
    size = f"{sz.get('file_size', 0) // 1024} KB"
    idle = f"{sz.get('idle_s', 0):g} s"
    return [
        (f"W1 single {size}, empty tree: p50 ms", _w1("p50_ms"), 1, True),
        ("W1 p95 ms", _w1("p95_ms"), 1, True),
        ("W1 max ms", _w1("max_ms"), 1, False),
        ("W1 samples (lost)", lambda r, t: _samples(_w1("samples")(r, t), _w1("lost")(r, t)), 0, False),
        (f"W2 burst {burst}: s", lambda r, t: _get(r, "empty", t, "w2", "seconds"), 2, True),
        ("W2 plain rsync of the set (floor) s", lambda r, t: _get(r, "empty", t, "w2", "rsync_s"), 2, False),
        ("W2 writing the files took s", lambda r, t: _get(r, "empty", t, "w2", "write_s"), 2, False),
        ("W2 first file at target after s", lambda r, t: _get(r, "empty", t, "w2", "first_arrival_s"), 2, False),
        (f"W3 single {size}, {big} tree: p50 ms", lambda r, t: _get(r, "big", t, "w3", "p50_ms"), 1, True),
        ("W3 p95 ms", lambda r, t: _get(r, "big", t, "w3", "p95_ms"), 1, True),
        ("W3 max ms", lambda r, t: _get(r, "big", t, "w3", "max_ms"), 1, False),
        ("W3 p50 / W1 p50", _growth, 2, False),
        (
            f"W4 peak RSS, {big} (daemon + ssh master) MB",
            lambda r, t: _get(r, "big", t, "rss", "resident_mb"),
            1,
            False,
        ),
        (
            "W4 RSS, empty tree (daemon + ssh master) MB",
            lambda r, t: _get(r, "empty", t, "rss", "resident_mb"),
            1,
            False,
        ),
        ("W4 peak PSS, big tree (daemon + ssh master) MB", lambda r, t: _get(r, "big", t, "rss", "pss_mb"), 1, False),
        ("W4 peak anonymous memory, big tree MB", lambda r, t: _get(r, "big", t, "rss", "anon_mb"), 1, False),
        ("W4 peak RSS incl. rsync children MB", lambda r, t: _get(r, "big", t, "rss", "tree_mb"), 1, False),
        (f"first full sync, {big} tree s", lambda r, t: _get(r, "big", t, "startup_s"), 1, False),
        (f"W5 idle CPU over {idle}, CPU s", lambda r, t: _get(r, "big", t, "idle", "cpu_s"), 3, False),
        *_fan_rows(r),
        ("tree checks", _checks, 0, False),
    ]


def _cell(n: int, *path: str) -> Callable[[dict[str, Any], str], Any]:
    """Getter of one W6 value of system ``t`` at N = ``n``."""
    return lambda r, t: _get(r, "fanout", "cells", t, str(n), *path)


def _fan_ns(r: dict[str, Any]) -> list[int]:
    return list(_get(r, "fanout", "n") or [])


def _fan_rows(r: dict[str, Any]) -> list[Row]:
    """W6 in the main table: per N, latency to all / first, burst, CPU, memory."""
    sz = r.get("sizes", {})
    size = f"{sz.get('file_size', 0) // 1024} KB"
    burst = f"{sz.get('fan_burst_files', 0):,} x {sz.get('fan_burst_size', 0) // 1024} KB"
    out: list[Row] = []
    for n in _fan_ns(r):
        w = f"W6 N={n}:"
        out += [
            (f"{w} single {size} to all targets p50 ms", _cell(n, "single", "all", "p50_ms"), 1, True),
            (f"{w} to all targets p95 ms", _cell(n, "single", "all", "p95_ms"), 1, True),
            (f"{w} to the first target p50 ms", _cell(n, "single", "first", "p50_ms"), 1, False),
            (f"{w} burst {burst} to all targets s", _burst_s(n), 2, True),
            (f"{w} sender CPU per single file ms", _cell(n, "single", "sender_cpu_ms_per_file"), 1, True),
            (f"{w} peak RSS daemon + ssh masters MB", _cell(n, "rss", "resident_mb"), 1, False),
            (f"{w} peak RSS daemon alone MB", _cell(n, "rss", "by_role_mb", "daemon"), 1, False),
            (f"{w} peak RSS incl. rsync children MB", _cell(n, "rss", "tree_mb"), 1, False),
        ]
    return out


def _cpu_bound(r: dict[str, Any], t: str, n: int) -> float | None:
    """The least wall time a single file to all N can take on this machine with the CPU the tool spent:
    sending plus receiving CPU per file spread over every core (everything runs on the same cores here)."""
    s = _num(_get(r, "fanout", "cells", t, str(n), "single", "sender_cpu_ms_per_file"))
    c = _num(_get(r, "fanout", "cells", t, str(n), "single", "receiver_cpu_ms_per_file"))
    cores = _num(_get(r, "machine", "cores")) or 1
    return round((s + c) / cores, 1) if s is not None and c is not None else None


def _burst_s(n: int) -> Callable[[dict[str, Any], str], Any]:
    """The burst's seconds, or "> T (timeout)" when some files had not arrived after T seconds."""

    def get(r: dict[str, Any], t: str) -> Any:
        b = _get(r, "fanout", "cells", t, str(n), "burst") or {}
        return f"> {b.get('timeout_s', 0):g} (timeout)" if b.get("timed_out") else b.get("seconds")

    return get


def _per_master(r: dict[str, Any], t: str, n: int, kind: str = "by_role_mb") -> float | None:
    total = _num(_get(r, "fanout", "cells", t, str(n), "rss", kind, "ssh masters"))
    count = _num(_get(r, "fanout", "cells", t, str(n), "rss", "by_role_count", "ssh masters"))
    return round(total / count, 2) if total is not None and count else None


def _fan_detail_rows(r: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for n in _fan_ns(r):
        w = f"W6 N={n}:"
        out += [
            (f"{w} first sync to every target s", _cell(n, "startup_s"), 2, False),
            (
                f"{w} single-file samples (lost)",
                lambda r, t, n=n: _samples(_cell(n, "single", "samples")(r, t), _cell(n, "single", "lost")(r, t)),
                0,
                False,
            ),
            (f"{w} to all targets max ms", _cell(n, "single", "all", "max_ms"), 1, False),
            (f"{w} slowest / fastest target (per-target p50)", _cell(n, "single", "target_p50_spread"), 2, False),
            (f"{w} receiver CPU per single file ms", _cell(n, "single", "receiver_cpu_ms_per_file"), 1, False),
            (f"{w} of the sending CPU: the daemon itself ms", _cell(n, "single", "daemon_cpu_ms_per_file"), 1, False),
            (f"{w} burst: writing took s", _cell(n, "burst", "write_s"), 2, False),
            (f"{w} burst: N plain rsyncs at once (floor) s", _cell(n, "burst", "rsync_s"), 2, False),
            (f"{w} burst sender CPU per file ms", _cell(n, "burst", "sender_cpu_ms_per_file"), 2, False),
            (f"{w} burst receiver CPU per file ms", _cell(n, "burst", "receiver_cpu_ms_per_file"), 2, False),
            (
                f"{w} burst: of the sending CPU, the daemon itself ms",
                _cell(n, "burst", "daemon_cpu_ms_per_file"),
                2,
                False,
            ),
            (
                f"{w} burst: rsync runs per target (sidecar)",
                _cell(n, "burst", "counters", "batches_per_target"),
                1,
                False,
            ),
            (f"{w} ssh masters (peak count)", _cell(n, "rss", "by_role_count", "ssh masters"), 0, False),
            (f"{w} RSS per ssh master MB", lambda r, t, n=n: _per_master(r, t, n), 2, False),
            (f"{w} PSS per ssh master MB", lambda r, t, n=n: _per_master(r, t, n, "by_role_pss_mb"), 2, False),
            (
                f"{w} USS (private) per ssh master MB",
                lambda r, t, n=n: _per_master(r, t, n, "by_role_uss_mb"),
                2,
                False,
            ),
            (f"{w} peak PSS daemon + ssh masters MB", _cell(n, "rss", "pss_mb"), 1, False),
            (f"{w} peak PSS incl. rsync children MB", _cell(n, "rss", "tree_pss_mb"), 1, False),
            (
                f"{w} CPU-bound minimum (sender + receiver CPU / cores) ms",
                lambda r, t, n=n: _cpu_bound(r, t, n),
                1,
                False,
            ),
            (f"{w} error", lambda r, t, n=n: (_cell(n, "error")(r, t) or None) and "see JSON", 0, False),
        ]
    return out


def _samples(n: Any, lost: Any) -> str | None:
    if n is None:
        return None
    return f"{n}" + (f" ({lost} LOST)" if lost else "")


def _growth(r: dict[str, Any], t: str) -> float | None:
    a, b = _num(_get(r, "big", t, "w3", "p50_ms")), _num(_get(r, "empty", t, "w1", "p50_ms"))
    return round(a / b, 2) if a is not None and b else None


def _tools(r: dict[str, Any]) -> list[str]:
    present = set(r.get("tools", {})) | set(_get(r, "fanout", "cells") or {})
    return [t for t in ORDER if t in present]


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _body(r: dict[str, Any], tools: list[str], rows_: list[Row]) -> list[list[str]]:
    """Formatted rows; rows no system has a value for (phases not run) are left out."""
    body = []
    for label, get, digits, _ in rows_:
        cells = [_fmt(get(r, t), digits) for t in tools]
        if any(c != "-" for c in cells):
            body.append([label, *cells])
    return body


def table(r: dict[str, Any]) -> str:
    """Markdown tables: the values, then the ratios to lsyncd (delay=0) and to the floor."""
    tools = _tools(r)
    header = ["metric", *[LABELS[t] for t in tools]]
    out = [_render(header, _body(r, tools, rows(r)))]
    for ref in ("lsyncd", "floor"):
        if ref not in tools:
            continue
        rbody = []
        for label, get, _, ratio in rows(r):
            if not ratio:
                continue
            base = _num(get(r, ref))
            cells = []
            for t in tools:
                v = _num(get(r, t))
                cells.append(f"{v / base:.2f}x" if v is not None and base else "-")
            if any(c != "-" for c in cells):
                rbody.append([_ratio_label(label), *cells])
        if rbody:
            out.append(f"\nRatio to {LABELS[ref]} (value / {LABELS[ref]}; < 1 is faster):\n")
            out.append(_render(["metric", *[LABELS[t] for t in tools]], rbody))
    return "\n".join(out)


def _ratio_label(label: str) -> str:
    """The row's name without its unit ("W1 ...: p50 ms" -> "W1 ... p50")."""
    if label.endswith(": p50 ms"):
        return label[: -len(": p50 ms")] + " p50"
    for suffix in (" ms", ": s", " s"):
        if label.endswith(suffix):
            return label[: -len(suffix)]
    return label


def fanout_table(r: dict[str, Any]) -> str:
    """W6 details: start-up, fairness between targets, receiver CPU, burst CPU, memory per ssh master."""
    tools = [t for t in _tools(r) if _get(r, "fanout", "cells", t)]
    body = _body(r, tools, _fan_detail_rows(r))
    return _render(["W6 details", *[LABELS[t] for t in tools]], body) if body else ""


# ----- targets -------------------------------------------------------------------------------------

IDLE_CPU_LIMIT_PCT = 0.5  # "~0": under half a percent of one core
RSS_LIMIT_MB = 40.0
RSS_FLAT_GROWTH = 1.10  # "flat": at most 10 % more on the big tree than on the empty one


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The sidecar's targets, each with the measured value and PASS/MISS (None: not measured)."""
    s_w1 = _get(r, "empty", "sidecar", "w1") or {}
    l_w1 = _get(r, "empty", "lsyncd", "w1") or {}
    s_w2 = _get(r, "empty", "sidecar", "w2") or {}
    f_w2 = _get(r, "empty", "floor", "w2") or {}
    s_w3 = _get(r, "big", "sidecar", "w3") or {}
    s_rss_big = _get(r, "big", "sidecar", "rss", "resident_mb")
    s_rss_empty = _get(r, "empty", "sidecar", "rss", "resident_mb")
    idle = _get(r, "big", "sidecar", "idle") or {}

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    def cmp(value: Any, limit: float) -> bool | None:
        v = _num(value)
        return None if v is None else v <= limit

    def ratio(a: Any, b: Any) -> float | None:
        x, y = _num(a), _num(b)
        return round(x / y, 2) if x is not None and y else None

    out = []

    def add(name: str, measured: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": measured, "verdict": verdict(ok)})

    add("W1 single-file p50 <= 100 ms", f"{_fmt(s_w1.get('p50_ms'))} ms", cmp(s_w1.get("p50_ms"), 100))
    add("W1 single-file p95 <= 150 ms", f"{_fmt(s_w1.get('p95_ms'))} ms", cmp(s_w1.get("p95_ms"), 150))
    rl = ratio(l_w1.get("p50_ms"), s_w1.get("p50_ms"))
    add(
        "W1 >= 2x faster than lsyncd delay=0 (p50)",
        f"lsyncd p50 / sidecar p50 = {_fmt(rl, 2)}x",
        None if rl is None else rl >= 2,
    )
    rl95 = ratio(l_w1.get("p95_ms"), s_w1.get("p95_ms"))
    add("W1 >= 2x faster than lsyncd delay=0 (p95)", f"{_fmt(rl95, 2)}x", None if rl95 is None else rl95 >= 2)
    rb = ratio(s_w2.get("seconds"), f_w2.get("rsync_s"))
    add(
        "W2 burst <= 1.5x one plain rsync of the set",
        f"{_fmt(s_w2.get('seconds'), 2)} s / {_fmt(f_w2.get('rsync_s'), 2)} s = {_fmt(rb, 2)}x",
        None if rb is None else rb <= 1.5,
    )
    rg = ratio(s_w3.get("p50_ms"), s_w1.get("p50_ms"))
    add(
        "W3 p50 on the big tree <= 1.2x empty-tree p50",
        f"{_fmt(s_w3.get('p50_ms'))} / {_fmt(s_w1.get('p50_ms'))} ms = {_fmt(rg, 2)}x",
        None if rg is None else rg <= 1.2,
    )
    add("W4 peak RSS on the big tree <= 40 MB", f"{_fmt(s_rss_big)} MB", cmp(s_rss_big, RSS_LIMIT_MB))
    rf = ratio(s_rss_big, s_rss_empty)
    add(
        "W4 RSS flat as the tree grows (big/empty <= 1.10)",
        f"{_fmt(s_rss_big)} / {_fmt(s_rss_empty)} MB = {_fmt(rf, 2)}x",
        None if rf is None else rf <= RSS_FLAT_GROWTH,
    )
    add(
        f"W5 idle CPU ~0 (<= {IDLE_CPU_LIMIT_PCT} % of a core)",
        f"{_fmt(idle.get('cpu_s'), 3)} CPU s in {_fmt(idle.get('seconds'), 0)} s"
        f" = {_fmt(idle.get('pct_of_core'), 2)} %",
        cmp(idle.get("pct_of_core"), IDLE_CPU_LIMIT_PCT),
    )
    _fan_targets(r, add, ratio)
    checks = _checks(r, "sidecar")
    add("trees equal after every workload", checks or "-", None if checks is None else checks.startswith("ok"))
    return out


FAN_FLOOR_FACTOR = 1.15  # all-targets p50 <= 1.15x the floor's
FAN_BURST_FACTOR = 0.6  # burst <= 0.6x lsyncd's
FAN_DAEMON_MB = 40.0  # the daemon's own RSS <= 40 MB + 1 MB per target
FAN_DAEMON_MB_PER_TARGET = 1.0


def _fan_targets(
    r: dict[str, Any],
    add: Callable[[str, str, bool | None], None],
    ratio: Callable[[Any, Any], float | None],
) -> None:
    """Issue 12's targets at N = 16 and 64 (a quick run: at its largest N, for the harness only)."""
    measured = [n for n in _fan_ns(r) if _get(r, "fanout", "cells", "sidecar", str(n), "single")]
    ns = [n for n in (16, 64) if n in measured] or measured[-1:]

    def at(t: str, n: int, *path: str) -> Any:
        return _get(r, "fanout", "cells", t, str(n), *path)

    def le(a: Any, b: Any, factor: float = 1.0) -> tuple[str, bool | None]:
        x = ratio(a, b)
        digits = 2 if (_num(a) or 0) < 10 else 1
        return f"{_fmt(a, digits)} / {_fmt(b, digits)} = {_fmt(x, 2)}x", None if x is None else x <= factor

    for n in ns:
        w = f"W6 N={n}:"
        p50 = at("sidecar", n, "single", "all", "p50_ms")
        add(
            f"{w} to-all p50 <= {FAN_FLOOR_FACTOR}x floor",
            *le(p50, at("floor", n, "single", "all", "p50_ms"), FAN_FLOOR_FACTOR),
        )
        add(f"{w} to-all p50 <= lsyncd's", *le(p50, at("lsyncd", n, "single", "all", "p50_ms")))
        burst = at("sidecar", n, "burst", "seconds")
        lsyncd_burst = at("lsyncd", n, "burst")
        if lsyncd_burst and lsyncd_burst.get("timed_out") and _num(burst) is not None:
            # lsyncd took longer than the timeout: the timeout is a lower bound of its time.
            bound = lsyncd_burst["timeout_s"]
            ok = burst <= FAN_BURST_FACTOR * bound
            add(f"{w} burst <= {FAN_BURST_FACTOR}x lsyncd's", f"{_fmt(burst, 2)} / > {bound:g} (timeout)", ok or None)
        else:
            add(
                f"{w} burst <= {FAN_BURST_FACTOR}x lsyncd's",
                *le(burst, at("lsyncd", n, "burst", "seconds"), FAN_BURST_FACTOR),
            )
        for what, path in (("single file", ("single",)), ("burst file", ("burst",))):
            cpu = at("sidecar", n, *path, "sender_cpu_ms_per_file")
            add(f"{w} sender CPU per {what} <= lsyncd's", *le(cpu, at("lsyncd", n, *path, "sender_cpu_ms_per_file")))
        tree_mb = at("sidecar", n, "rss", "tree_mb")
        add(f"{w} peak RSS incl. rsync children <= lsyncd's", *le(tree_mb, at("lsyncd", n, "rss", "tree_mb")))
        tree_pss = at("sidecar", n, "rss", "tree_pss_mb")
        add(f"{w} same in PSS (shared pages split; info)", le(tree_pss, at("lsyncd", n, "rss", "tree_pss_mb"))[0], None)
        own = _num(at("sidecar", n, "rss", "by_role_mb", "daemon"))
        limit = FAN_DAEMON_MB + FAN_DAEMON_MB_PER_TARGET * n
        add(
            f"{w} daemon alone <= {limit:g} MB (40 + 1/target)",
            f"{_fmt(own)} MB",
            None if own is None else own <= limit,
        )
        spread = at("sidecar", n, "single", "target_p50_spread")
        add(f"{w} slowest / fastest target p50 (info)", f"{_fmt(spread, 2)}x", None)


def targets_table(r: dict[str, Any]) -> str:
    # Targets of phases that did not run (nothing measured) are left out.
    rows_ = [
        [t["target"], t["measured"], t["verdict"]]
        for t in r.get("targets", [])
        if t["verdict"] != "n/a" or re.search(r"\d", re.sub(r"\bp\d+\b", "", t["measured"]))
    ]
    return _render(["sidecar target", "measured", "verdict"], rows_)


def machine_table(m: dict[str, Any]) -> str:
    keys = ["date", "cpu", "cores", "memory_gb", "kernel", "os", "python", "rsync", "ssh", "lsyncd", "inotifywait"]
    keys += ["sidecar_commit", "fs_inotify_max_queued_events", "sched_autogroup_during_run"]
    body = [[k, str(m.get(k, ""))] for k in keys]
    for k in ("background_before", "during_run", "background_after"):
        if isinstance(v := m.get(k), dict):
            body.append([f"{k} (CPU, all cores)", f"busy {v.get('busy_pct')} %, steal {v.get('steal_pct')} %"])
    return _render(["machine", ""], body)


# ----- files -------------------------------------------------------------------------------------


def write_json(r: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    """``latest.json`` plus a dated copy (never overwritten by a later run)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(r, indent=2, sort_keys=False, default=str) + "\n"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-quick" if r.get("mode") == "quick" else ""
    dated = results_dir / f"{stamp}{suffix}.json"
    latest = results_dir / ("latest.json" if not suffix else "latest-quick.json")
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(latest)
    shutil.copyfile(latest, dated)
    return latest, dated


def chart(r: dict[str, Any], path: Path) -> Path:
    """Four panels: single-file latency (both trees), burst, RSS (empty vs big), idle CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in _tools(r) if t not in W1_ONLY]  # single-file-only rows are in the table
    names = [LABELS[t] for t in tools]
    colors = {"sidecar": "#1f77b4", "lsyncd": "#ff7f0e", "loop": "#2ca02c", "floor": "#7f7f7f"}
    col = [colors.get(t, "#9467bd") for t in tools]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    sz = r.get("sizes", {})
    m = r.get("machine", {})
    fig.suptitle(
        f"upsync benchmark ({r.get('mode')}) - {m.get('cpu', '')}, {m.get('cores')} cores, "
        f"{m.get('date', '')[:10]}; loopback sshd",
        fontsize=11,
    )

    ax = axes[0][0]
    width = 0.2
    series = [
        ("W1 empty tree p50", lambda t: _get(r, "empty", t, "w1", "p50_ms"), 1.0, None),
        ("W1 empty tree p95", lambda t: _get(r, "empty", t, "w1", "p95_ms"), 0.45, None),
        (f"W3 {sz.get('big_files', 0):,}-file tree p50", lambda t: _get(r, "big", t, "w3", "p50_ms"), 1.0, "//"),
        (f"W3 {sz.get('big_files', 0):,}-file tree p95", lambda t: _get(r, "big", t, "w3", "p95_ms"), 0.45, "//"),
    ]
    # The full-tree loop on the big tree reaches seconds: clip there (value written on the bar) so the
    # tens of milliseconds of the others stay readable.
    everything = [_num(get(t)) or 0.0 for _, get, _, _ in series for t in tools]
    top = 250.0 if max(everything, default=0) > 250 else None
    for i, (label, get, alpha, hatch) in enumerate(series):
        xs = [j + (i - 1.5) * width for j in range(len(tools))]
        vals = [_num(get(t)) or 0.0 for t in tools]
        shown = [min(v, top) if top else v for v in vals]
        ax.bar(xs, shown, width, color=col, alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.4)
        for x, v, h in zip(xs, vals, shown, strict=True):
            if v:
                text = f"{v:.0f}" if v == h else f"{v:,.0f}^"
                ax.text(x, h, text, ha="center", va="bottom", fontsize=7, rotation=0 if v == h else 90)
        ax.bar([0], [0], 0, color="grey", alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.4, label=label)
    if top:
        ax.set_ylim(0, top * 1.25)
    ax.axhline(100, color="red", linestyle=":", linewidth=1, label="sidecar target p50 100 ms")
    ax.set_xticks(range(len(tools)), names)
    ax.set_ylabel("ms from write to complete at target")
    ax.set_title("single 64 KB file (lsyncd delay=15: ~15,000 ms, not drawn; ^ = clipped)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0][1]
    vals = [_num(_get(r, "empty", t, "w2", "seconds")) or 0.0 for t in tools]
    ax.bar(names, vals, color=col)
    floor = _num(_get(r, "empty", "floor", "w2", "rsync_s"))
    if floor:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1)
        ax.axhline(1.5 * floor, color="red", linestyle=":", linewidth=1)
        ax.text(-0.45, floor, "1 plain rsync", va="bottom", ha="left", fontsize=8)
        ax.text(-0.45, 1.5 * floor, "target 1.5x", va="bottom", ha="left", fontsize=8, color="red")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f} s", ha="center", va="bottom", fontsize=8)
    ax.set_title(f"burst: {sz.get('burst_files', 0):,} x {sz.get('burst_size', 0) // 1024} KB files -> all at target")
    ax.set_ylabel("seconds (from first write)")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][0]
    daemons = [t for t in tools if t != "floor"]
    xs = range(len(daemons))
    empty = [_num(_get(r, "empty", t, "rss", "resident_mb")) or 0.0 for t in daemons]
    bigv = [_num(_get(r, "big", t, "rss", "resident_mb")) or 0.0 for t in daemons]
    pss = [_num(_get(r, "big", t, "rss", "pss_mb")) or 0.0 for t in daemons]
    for off, vals_, label, color in (
        (-0.27, empty, "RSS, empty tree", "#aec7e8"),
        (0.0, bigv, f"RSS, {sz.get('big_files', 0):,}-file tree (peak)", "#1f77b4"),
        (0.27, pss, "PSS (shared pages split), same", "#17becf"),
    ):
        ax.bar([x + off for x in xs], vals_, 0.27, label=label, color=color)
        for x, v in zip(xs, vals_, strict=True):
            ax.text(x + off, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(RSS_LIMIT_MB, color="red", linestyle=":", linewidth=1, label="sidecar target 40 MB")
    ax.set_xticks(list(xs), [LABELS[t] for t in daemons])
    ax.set_ylabel("MB (daemon + its ssh master)")
    ax.set_title("resident memory")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][1]
    vals = [_num(_get(r, "big", t, "idle", "pct_of_core")) or 0.0 for t in daemons]
    ax.bar([LABELS[t] for t in daemons], vals, color=[colors.get(t, "#9467bd") for t in daemons])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f} %", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("% of one core")
    ax.set_title(f"idle CPU over {sz.get('idle_s', 0):g} s, nothing changing (big tree)")
    ax.grid(axis="y", alpha=0.3)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fanout_chart(r: dict[str, Any], path: Path) -> Path:
    """W6 against N, each system a line: latency to all targets, burst, resident memory, CPU per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = _fan_ns(r)
    tools = [t for t in ("sidecar", "lsyncd", "floor", "floor_k") if _get(r, "fanout", "cells", t)]
    colors = {"sidecar": "#1f77b4", "lsyncd": "#ff7f0e", "floor": "#7f7f7f", "floor_k": "#2ca02c"}
    sz = r.get("sizes", {})
    m = r.get("machine", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(
        f"upsync W6 fan-out ({r.get('mode')}) - {m.get('cpu', '')}, {m.get('cores')} cores, "
        f"{m.get('date', '')[:10]}; one loopback sshd per target (127.0.0.x)",
        fontsize=11,
    )

    def line(ax: Any, t: str, path: tuple[str, ...], style: str = "-", label: str | None = None) -> None:
        pts = [(n, _num(_get(r, "fanout", "cells", t, str(n), *path))) for n in ns]
        pts = [(n, v) for n, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors[t], label=label or LABELS[t])

    def axis(ax: Any, title: str, ylabel: str, log_y: bool = True) -> None:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("targets N")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)

    ax = axes[0][0]
    for t in tools:
        line(ax, t, ("single", "all", "p50_ms"))
        line(ax, t, ("single", "all", "p95_ms"), ":", f"{LABELS[t]} p95")
    axis(ax, f"single {sz.get('file_size', 0) // 1024} KB file: until complete on all N targets (p50, p95)", "ms")

    ax = axes[0][1]
    for t in tools:
        line(ax, t, ("burst", "seconds"))
    axis(
        ax,
        f"burst of {sz.get('fan_burst_files', 0):,} x {sz.get('fan_burst_size', 0) // 1024} KB: until all N hold all",
        "seconds from the first write",
    )

    ax = axes[1][0]
    for t in tools:
        if t == "floor_k":
            continue  # the same masters as the floor
        what = "its ssh masters" if t == "floor" else "daemon + ssh masters"
        line(ax, t, ("rss", "resident_mb"), "-", f"{LABELS[t]}: {what}")
        line(ax, t, ("rss", "tree_mb"), "--", f"{LABELS[t]}: incl. rsync children")
        if t != "floor":
            line(ax, t, ("rss", "by_role_mb", "daemon"), ":", f"{LABELS[t]}: daemon alone")
    axis(ax, "peak resident memory (RSS)", "MB")

    ax = axes[1][1]
    for t in tools:
        line(ax, t, ("single", "sender_cpu_ms_per_file"), "-", f"{LABELS[t]}: per single file")
        line(ax, t, ("burst", "sender_cpu_ms_per_file"), "--", f"{LABELS[t]}: per burst file")
    axis(ax, "sending side CPU per file written (all N targets)", "CPU ms")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
