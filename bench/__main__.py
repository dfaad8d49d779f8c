"""One command: ``.venv/bin/python -m bench [--quick]`` (as root, from the repository root).

Starts one loopback sshd (plain /bin/sh account), then runs every tool on the same workloads, one
tool at a time so they never compete for the two cores:

1. empty tree: W1 single-file latency, W2 burst, RSS on the empty tree; lsyncd at its default
   delay=15 s gets a few W1 samples of its own;
2. big tree (built once, copied once, then already in sync for every tool): W3 single-file latency,
   W4 peak RSS (sampled from start-up to the end of W3), W5 idle CPU.

Results: a table on stdout, ``bench/results/latest.json`` (+ a dated copy), ``bench/results/chart.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
RESULTS = BENCH / "results"

_T0 = time.monotonic()


# Tools measured on the single-file workload only (slow, or context for the lsyncd anchor).
W1_ONLY = ("lsyncd_d15", "lsyncd_nomux")
# ... and in W6 only.
FANOUT_ONLY = ("floor_k",)


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


# The programs the benchmark runs, by Debian package (rsync, sshd and ssh are the tests' too: tests/run.sh).
_PROGRAMS = {
    "rsync": "rsync",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "lsyncd": "lsyncd",
    "inotifywait": "inotify-tools",
}


def _ensure_programs(tools: list[str], no_install: bool) -> None:
    """apt-get install what is missing of rsync, sshd, ssh and what the wanted systems run: lsyncd, and
    inotifywait for the full-tree loop."""
    wanted = ["rsync", "sshd", "ssh"] + (["lsyncd"] if any(t.startswith("lsyncd") for t in tools) else [])
    wanted += ["inotifywait"] if "loop" in tools else []
    paths = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = sorted({_PROGRAMS[p] for p in wanted if shutil.which(p, path=paths) is None})
    if not missing or no_install:
        return
    say(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "env": env, "check": True}
    subprocess.run(["apt-get", "update", "-q"], **quiet)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], **quiet)


def _ensure_environment(no_install: bool, profile: bool) -> None:
    """Run inside the project venv (the sidecar runs as ``sys.executable -m sidecar``); install bench deps."""
    if importlib.util.find_spec("watchfiles") is None and VENV_PY.exists() and Path(sys.executable) != VENV_PY:
        os.execv(VENV_PY, [str(VENV_PY), "-m", "bench", *sys.argv[1:]])
    missing = [m for m in ("matplotlib",) if importlib.util.find_spec(m) is None]
    if profile and _py_spy() is None:
        missing.append("py-spy")
    if missing and not no_install:
        say(f"installing {', '.join(missing)} from bench/requirements.txt into {sys.prefix}")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", "bench/requirements.txt"], cwd=REPO, check=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    p.add_argument("--samples", type=int, help="single-file samples per tool and tree (default 30, quick 6)")
    p.add_argument(
        "--tools",
        default="floor,floor_k,sidecar,lsyncd,lsyncd_d15,lsyncd_nomux,loop",
        help="comma-separated subset of floor,floor_k,sidecar,lsyncd,lsyncd_d15,lsyncd_nomux,loop "
        "(floor_k: W6 only, the floor with at most as many rsyncs at once as there are cores)",
    )
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="SYNC_X=VALUE",
        help="extra sidecar setting (repeatable), e.g. to try SYNC_QUIET_MS=5; recorded in the JSON",
    )
    p.add_argument(
        "--phases",
        default="empty,big,fanout",
        help="comma-separated subset of empty (W1, W2, lsyncd delay=15), big (W3, W4, W5) and fanout (W6); "
        "for quick iterations",
    )
    p.add_argument(
        "--fanout-n",
        metavar="N,N,...",
        help="W6 target counts (default 1,4,16,64; quick 1,4); at most 250 (127.0.0.2..127.0.0.251)",
    )
    p.add_argument(
        "--fanout-burst",
        type=int,
        metavar="FILES",
        help="files in W6's burst (default 10,000; quick 1,000)",
    )
    p.add_argument(
        "--fanout-floor-k",
        type=int,
        metavar="K",
        help="W6's bounded floor (floor_k) runs at most K rsyncs at once (default: the number of cores)",
    )
    p.add_argument(
        "--no-autogroup",
        action="store_true",
        help="turn the kernel's autogroup scheduling off for the run (kernel.sched_autogroup_enabled=0, "
        "restored at the end): with it on, CPU is shared per session first, and how a tool spreads its "
        "rsyncs over sessions decides its share (W6). Changes scheduling machine-wide while the run lasts",
    )
    p.add_argument(
        "--profile", action="store_true", help="py-spy record the sidecar during W1, W2, W3 and W6's single files"
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        help="where the trees live (default: /dev/shm if it is a tmpfs with room, else the system temp dir)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (< 10 %% busy), e.g. while other jobs finish",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="where JSON and chart go (default bench/results)")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="run nothing: print the tables and redraw the chart from a results file",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="never pip or apt-get install (no chart if matplotlib is missing; a missing lsyncd is reported)",
    )
    return p.parse_args(argv)


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            mnt = parts[1]
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


def _default_tmpdir() -> Path:
    """tmpfs when there is one with room: on this VM ext4 writeback (kworker CPU) otherwise leaks from one
    phase into the next and swamps the tools' own cost. ``--tmpdir /tmp`` measures on disk instead."""
    shm = Path("/dev/shm")
    if shm.is_dir() and _fs_type(shm) == "tmpfs":
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 4 << 30:
            return shm
    return Path(tempfile.gettempdir())


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def _autogroup() -> str:
    try:
        return AUTOGROUP.read_text().strip()
    except OSError:
        return "n/a"


def _autogroup_off(stack: contextlib.ExitStack) -> None:
    """kernel.sched_autogroup_enabled=0 for the run; the old value is written back when the stack closes."""
    old = _autogroup()
    if old in ("0", "n/a"):
        return
    AUTOGROUP.write_text("0\n")
    stack.callback(AUTOGROUP.write_text, old + "\n")
    say("autogroup scheduling off for the run (kernel.sched_autogroup_enabled 1 -> 0, restored at the end)")


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_leftovers(base: Path) -> None:
    """Last resort: kill processes we started whose command line names our temp directory."""
    from bench.proc import cmdline

    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if any(str(base) in a for a in cmdline(int(entry))):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _ensure_environment(args.no_install, args.profile)
    if os.geteuid() != 0:
        print("run as root: the benchmark creates the ssh target account and starts sshd", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from bench import report
    from bench.workloads import FULL, QUICK

    if args.report_only:
        import json

        results = json.loads(args.report_only.read_text())
        _print_report(results)
        if importlib.util.find_spec("matplotlib") is not None:
            for written in _charts(results, args.report_only.parent):
                say(f"wrote {written}")
        return 0

    sizes = QUICK if args.quick else FULL
    if args.samples:
        sizes = replace(sizes, samples=args.samples, fan_samples=args.samples)
    if args.fanout_n:
        try:
            ns = tuple(int(x) for x in args.fanout_n.split(",") if x.strip())
        except ValueError:
            ns = ()
        if not ns or not all(1 <= x <= 250 for x in ns):
            print(f"invalid --fanout-n {args.fanout_n!r}: must be numbers from 1 to 250, e.g. 1,4,16", file=sys.stderr)
            return 2
        sizes = replace(sizes, fan_n=ns)
    if args.fanout_burst is not None:
        if args.fanout_burst < 1:
            print(f"invalid --fanout-burst {args.fanout_burst}: must be at least 1", file=sys.stderr)
            return 2
        sizes = replace(sizes, fan_burst_files=args.fanout_burst)
    if args.fanout_floor_k is not None and args.fanout_floor_k < 1:
        print(f"invalid --fanout-floor-k {args.fanout_floor_k}: must be at least 1", file=sys.stderr)
        return 2
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    _ensure_programs(wanted, args.no_install)
    extra_env = dict(kv.split("=", 1) for kv in args.sidecar_env)
    # SIGINT too: a shell may have started us with it ignored (background job), and Ctrl-C must clean up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": report.machine_info(),
        "sizes": asdict(sizes),
        "sidecar_env": extra_env,
        "phases": args.phases,
        "timing": "latency = from just before open() of the source file to the complete file at the target",
    }
    say(f"upsync benchmark ({results['mode']}): {', '.join(wanted)}")
    from bench.proc import SystemCpu, system_busy

    background = system_busy(2.0)
    deadline = time.monotonic() + args.wait_quiet
    while background["busy_pct"] > 10 and time.monotonic() < deadline:
        say(f"waiting for a quiet machine: {background['busy_pct']} % busy")
        time.sleep(8.0)
        background = system_busy(2.0)
    results["machine"]["background_before"] = background
    if background["busy_pct"] > 10:
        say(f"WARNING: the machine is {background['busy_pct']} % busy before we start: the numbers will be noisy")
    started = time.monotonic()
    cpu_start = SystemCpu()
    tmpdir = args.tmpdir or _default_tmpdir()
    results["data_dir"] = f"{tmpdir} ({_fs_type(tmpdir)})"
    say(f"trees live under {results['data_dir']}")
    if "fanout" in args.phases and not args.no_autogroup and _autogroup() == "1":
        say(
            "NOTE: autogroup scheduling is on: CPU goes to sessions first, and the sidecar starts each rsync in "
            "a session of its own while lsyncd's share one; for W6 numbers to quote, run with --no-autogroup"
        )
    base = Path(tempfile.mkdtemp(prefix="upsync-bench-", dir=tmpdir))
    base.chmod(0o755)  # the target account must reach the sshd's target directory inside
    try:
        with contextlib.ExitStack() as stack:
            if args.no_autogroup:
                _autogroup_off(stack)
            results["machine"]["sched_autogroup_during_run"] = _autogroup()
            stack.callback(shutil.rmtree, base, True)
            stack.callback(_kill_leftovers, base)
            _run(results, base, sizes, wanted, extra_env, args, stack)
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped and removed")
        return 130
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["machine"]["during_run"] = SystemCpu().since(cpu_start)
    results["machine"]["background_after"] = system_busy(2.0)
    results["targets"] = report.targets(results)

    _print_report(results)
    latest, dated = report.write_json(results, args.results)
    say(f"wrote {latest} and {dated}")
    if importlib.util.find_spec("matplotlib") is not None:
        for written in _charts(results, args.results):
            say(f"wrote {written}")
    else:
        say("matplotlib is missing: no chart")
    say(f"done in {results['duration_s']:.0f} s")
    return 0


def _charts(results: dict[str, Any], where: Path) -> list[Path]:
    """chart.png (W1-W5) and chart-fanout.png (W6), each only if its phases ran; ``-quick`` for a quick run."""
    from bench import report

    suffix = "-quick" if results.get("mode") == "quick" else ""
    out = []
    if results.get("empty") or results.get("big"):
        out.append(report.chart(results, where / f"chart{suffix}.png"))
    if results.get("fanout", {}).get("cells"):
        out.append(report.fanout_chart(results, where / f"chart-fanout{suffix}.png"))
    return out


def _print_report(results: dict[str, Any]) -> None:
    from bench import report

    print()
    print(report.machine_table(results["machine"]))
    print(f"\ntrees on {results.get('data_dir', '?')}; run took {results.get('duration_s', '?')} s\n")
    results["targets"] = report.targets(results)  # again: --report-only of an older file gets today's targets
    print(report.table(results))
    if details := report.fanout_table(results):
        print()
        print(details)
    print()
    print(report.targets_table(results))


@contextlib.contextmanager
def _running(tool: Any, src: Path, dst: Path, logs: Path, phase: str) -> Iterator[float]:
    """The tool runs inside the block; its log is kept in ``logs`` (evidence for odd samples)."""
    try:
        yield tool.start(src, dst)
    except BaseException:
        if tail := tool.log_tail():
            say(f"{tool.label} log tail:\n{tail}")
        raise
    finally:
        tool.stop()
        if tool.log_file is not None and tool.log_file.exists():
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tool.log_file, logs / f"{tool.key}-{phase}.log")


def _sidecar_metrics(tool: Any) -> dict[str, float]:
    from bench.tools import SidecarTool

    if not isinstance(tool, SidecarTool) or tool.sc is None:
        return {}
    text = tool.sc.get("/metrics")[1]
    want = {
        "batches": ("upsync_syncs_total", 'kind="batch"'),
        "full_syncs": ("upsync_syncs_total", 'kind="full"'),
        "events": ("upsync_events_total", ""),
        "lost_events_full_sync_requests": ("upsync_watcher_restarts_total", 'reason="lost"'),
        "latency_sum_s": ("upsync_replication_latency_seconds_sum", ""),
        "latency_count": ("upsync_replication_latency_seconds_count", ""),
    }
    out = dict.fromkeys(want, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        head, value = line.rsplit(" ", 1)
        name = head.split("{", 1)[0]
        for key, (metric, label) in want.items():
            if name == metric and label in head:
                out[key] += float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    d = {k: round(after[k] - before.get(k, 0.0), 4) for k in after}
    if d.get("latency_count"):
        d["self_reported_mean_ms"] = round(1000 * d["latency_sum_s"] / d["latency_count"], 1)
    return d


@contextlib.contextmanager
def _profiled(tool: Any, enabled: bool, name: str, results_dir: Path) -> Iterator[None]:
    """py-spy record the sidecar's Python process during the block: wall-clock and on-CPU stacks.

    Writes ``profile-NAME-wall.txt`` / ``-cpu.txt`` (collapsed stacks; speedscope.app opens them) and
    ``profile-NAME.md`` (per thread: where the samples are). py-spy pauses the process to sample, so a
    profiled run's timings are not the benchmark's numbers.
    """
    if not enabled or tool.key != "sidecar" or not tool.roots():
        yield
        return
    spy = _py_spy()
    if spy is None:
        say("  py-spy not found (pip install -r bench/requirements.txt): no profile")
        yield
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"profile-{name}"
    common = [spy, "record", "--threads", "--rate", "250", "--format", "raw", "--pid", str(tool.roots()[0])]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen([*common, "--idle", "-o", f"{out}-wall.txt"], **quiet),
        subprocess.Popen([*common, "-o", f"{out}-cpu.txt"], **quiet),
    ]
    time.sleep(1.0)  # py-spy needs a moment to attach
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        Path(f"{out}.md").write_text(
            _profile_summary(Path(f"{out}-wall.txt"), "wall clock (idle included)")
            + "\n"
            + _profile_summary(Path(f"{out}-cpu.txt"), "on CPU")
        )
        say(f"  profile: {out}.md")


def _profile_summary(raw: Path, what: str, top: int = 8) -> str:
    """Per thread: sample count and the frames where its samples end (the leaf), as a Markdown list."""
    if not raw.exists():
        return f"## {what}\n\n(no samples)\n"
    threads: dict[str, dict[str, int]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # "thread (123): worker ssh://..." -> "worker"; the leaf keeps file:line
        thread = frames[0].split(": ", 1)[-1].split(" ", 1)[0]
        leaf = frames[-1]
        threads.setdefault(thread, {})
        threads[thread][leaf] = threads[thread].get(leaf, 0) + int(count)
    lines = [f"## {what}\n"]
    for thread, leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        lines.append(f"- **{thread}**: {total} samples")
        for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  - {100 * n / total:5.1f} % `{leaf}`")
    return "\n".join(lines) + "\n"


def _run(
    results: dict[str, Any],
    base: Path,
    sizes: Any,
    wanted: list[str],
    extra_env: dict[str, str],
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
) -> None:
    from bench import workloads as w
    from bench.proc import RssSampler
    from bench.tools import FloorTool, LoopTool, LsyncdTool, SidecarTool, SshSetup, Tool

    ssh = SshSetup(base)
    stack.callback(ssh.stop)
    ssh.start()
    say(f"sshd on 127.0.0.1:{ssh.server.port}, account {ssh.server.user} (/bin/sh, no rrsync)")

    def make(key: str, workdir: Path) -> Tool:
        workdir.mkdir(parents=True, exist_ok=True)
        if key == "sidecar":
            return SidecarTool(ssh, workdir, extra_env)
        if key == "lsyncd":
            return LsyncdTool(ssh, workdir, 0)
        if key == "lsyncd_d15":
            return LsyncdTool(ssh, workdir, None)
        if key == "lsyncd_nomux":
            return LsyncdTool(ssh, workdir, 0, mux=False)
        if key == "loop":
            return LoopTool(ssh, workdir)
        if key == "floor":
            return FloorTool(ssh, workdir)
        raise SystemExit(f"unknown tool {key!r}")

    tools = {k: make(k, base / "work" / k) for k in wanted if k not in FANOUT_ONLY}
    results["tools"] = {k: {"label": t.label, **t.describe()} for k, t in tools.items()}
    results["empty"], results["big"] = {}, {}
    n, size = sizes.samples, sizes.file_size
    logs = args.results / "logs" / results["mode"]
    shutil.rmtree(logs, ignore_errors=True)  # only the latest run's logs

    # ----- 1. empty tree: W1, W2 ------------------------------------------------------------------
    phases = {p.strip() for p in args.phases.split(",")}
    daemons = [k for k in wanted if k not in W1_ONLY and k not in FANOUT_ONLY]
    for key in daemons if "empty" in phases else []:
        tool = tools[key]
        src, dst = base / "src" / f"{key}-empty", ssh.make_target(f"{key}-empty")
        w.seed_tree(src)
        res: dict[str, Any] = {}
        results["empty"][key] = res
        sampler = RssSampler(tool.resident, tool.roots)
        with _running(tool, src, dst, logs, "empty") as startup:
            res["startup_s"] = round(startup, 2)
            sampler.start()
            say(f"{tool.label}: ready in {startup:.2f} s; W1 {n} x {size // 1024} KB single files (empty tree)")
            m0 = _sidecar_metrics(tool)
            with _profiled(tool, args.profile, "w1-empty", args.results):
                res["w1"] = w.single_file(tool, src, dst, n, key, size, sizes.timeout_s)
            sampler.stop()
            if key != "floor":  # the floor is no daemon: nothing resident to speak of
                res["rss"] = sampler.result()
            res["w1_check"] = w.check_tree(tool, src, dst)  # waits until the tool is idle
            if m0:
                res["w1_sidecar_metrics"] = _delta(_sidecar_metrics(tool), m0)
            r1 = res["w1"]
            say(
                f"  p50 {r1['p50_ms']} ms, p95 {r1['p95_ms']} ms, max {r1['max_ms']} ms, lost {r1['lost']}; "
                f"RSS {res.get('rss', {}).get('resident_mb', '-')} MB; "
                f"trees {'equal' if res['w1_check']['ok'] else 'DIFFER: ' + str(res['w1_check']['examples'])}"
            )
            say(f"{tool.label}: W2 burst of {sizes.burst_files:,} x {sizes.burst_size // 1024} KB")
            m0 = _sidecar_metrics(tool)
            with _profiled(tool, args.profile, "w2-burst", args.results):
                res["w2"] = w.burst(
                    tool, src, dst, sizes.burst_files, sizes.burst_dirs, sizes.burst_size, timeout=600.0
                )
            res["w2_check"] = w.check_tree(tool, src, dst)
            if m0:
                res["w2_sidecar_metrics"] = _delta(_sidecar_metrics(tool), m0)
            r2 = res["w2"]
            extra = f" (plain rsync alone {r2['rsync_s']} s)" if "rsync_s" in r2 else ""
            say(
                f"  all at target after {r2['seconds']} s{extra}, writing took {r2['write_s']} s, "
                f"first file at target after {r2['first_arrival_s'] or '-'} s; "
                f"trees {'equal' if res['w2_check']['ok'] else 'DIFFER: ' + str(res['w2_check']['examples'])}"
            )

    # Context rows, single-file workload only: lsyncd's default delay (15 s a sample) and lsyncd
    # without ssh multiplexing (a handshake per change).
    results["w1_only"] = {}
    for key in [k for k in W1_ONLY if k in tools] if "empty" in phases else []:
        tool = tools[key]
        src, dst = base / "src" / f"{key}-empty", ssh.make_target(f"{key}-empty")
        w.seed_tree(src)
        k = sizes.default_delay_samples if key == "lsyncd_d15" else n
        with _running(tool, src, dst, logs, "empty") as startup:
            say(f"{tool.label}: ready in {startup:.2f} s; W1 {k} sample(s)")
            one = {"w1": w.single_file(tool, src, dst, k, key, size, sizes.timeout_s)}
            one["check"] = w.check_tree(tool, src, dst)
        results["w1_only"][key] = one
        say(f"  p50 {one['w1']['p50_ms']} ms, max {one['w1']['max_ms']} ms")

    # ----- 2. big tree: W3, W4, W5 ---------------------------------------------------------------
    if "big" in phases:
        _big_phase(results, base, ssh, tools, daemons, sizes, logs, args)

    # ----- 3. fan-out: W6 ----------------------------------------------------------------------------
    if "fanout" in phases:
        from bench.fanout import run_fanout

        def profiled(tool: Any, name: str) -> contextlib.AbstractContextManager[None]:
            return _profiled(tool, args.profile, name, args.results)

        run_fanout(results, ssh, base, sizes, wanted, extra_env, logs, say, stack, args.fanout_floor_k, profiled)


def _big_phase(
    results: dict[str, Any],
    base: Path,
    ssh: Any,
    tools: dict[str, Any],
    daemons: list[str],
    sizes: Any,
    logs: Path,
    args: argparse.Namespace,
) -> None:
    """W3, W4, W5 on the big tree (built once, copied once, then already in sync for every tool)."""
    from bench import workloads as w
    from bench.proc import RssSampler

    n, size = sizes.samples, sizes.file_size
    src = base / "src" / "big"
    dst = ssh.make_target("big")
    say(f"building the big tree: {sizes.big_files:,} files in {sizes.big_dirs:,} directories")
    t0 = time.perf_counter()
    big_dirs = w.build_big_tree(src, sizes.big_files, sizes.big_dirs, say)
    results["big"]["build_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ssh.rsync(["-a", f"{src}/", ssh.dest(dst)])
    results["big"]["initial_copy_s"] = round(time.perf_counter() - t0, 1)
    say(f"  built in {results['big']['build_s']} s, copied to the target in {results['big']['initial_copy_s']} s")

    for key in daemons:
        tool = tools[key]
        res = {}
        results["big"][key] = res
        sampler = RssSampler(tool.resident, tool.roots)
        sampler.start()  # from start-up on: the first full sync of the big tree counts too
        try:
            with _running(tool, src, dst, logs, "big") as startup:
                res["startup_s"] = round(startup, 2)
                say(f"{tool.label}: ready on the big tree in {startup:.2f} s; W3 {n} single files")
                m0 = _sidecar_metrics(tool)
                with _profiled(tool, args.profile, "w3-big", args.results):
                    res["w3"] = w.single_file(tool, src, dst, n, f"{key}-big", size, sizes.timeout_s, big_dirs)
                sampler.stop()
                if key != "floor":
                    res["rss"] = sampler.result()
                w.wait_idle(tool)
                if m0:
                    res["w3_sidecar_metrics"] = _delta(_sidecar_metrics(tool), m0)
                r3 = res["w3"]
                rss = res.get("rss", {})
                say(
                    f"  p50 {r3['p50_ms']} ms, p95 {r3['p95_ms']} ms, max {r3['max_ms']} ms, lost {r3['lost']}; "
                    f"peak RSS {rss.get('resident_mb', '-')} MB ({rss.get('tree_mb', '-')} MB with rsync children)"
                )
                res["w3_check"] = w.check_tree(tool, src, dst)
                say(f"  trees {'equal' if res['w3_check']['ok'] else 'DIFFER: ' + str(res['w3_check']['examples'])}")
                if key != "floor":
                    say(f"{tool.label}: W5 idle CPU over {sizes.idle_s:g} s")
                    res["idle"] = w.idle_cpu(tool, sizes.idle_s)
                    say(f"  {res['idle']['cpu_s']} CPU s ({res['idle']['pct_of_core']} % of a core)")
        finally:
            sampler.stop()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside the run proper (waiting for a quiet machine): nothing to clean
        sys.exit(130)
