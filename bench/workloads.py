"""The workloads: trees to start from, what is written, and how "complete at the target" is detected.

Timing rules (the same for every tool):

* latency is measured from just *before* ``open()`` of the source file until the file is complete
  at the target (right size, then byte-compared), polled every 2 ms;
* before each sample the tool must be idle (no rsync in its process tree for 150 ms), so samples do
  not overlap with the tail of the previous one;
* at the end of every workload the source and target trees are compared byte for byte
  (``tests.helpers.tree_diff``); a tool that loses or corrupts a file fails that workload.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.proc import cpu_seconds, descendants, processes
from bench.tools import FloorTool, Tool
from tests.helpers import tree_diff

__all__ = [
    "Sizes",
    "build_big_tree",
    "burst",
    "check_tree",
    "idle_cpu",
    "percentile",
    "seed_tree",
    "single_file",
    "wait_idle",
]

POLL_S = 0.002  # target poll step for single files
BURST_POLL_S = 0.025  # coarser for the burst (each poll lists the incomplete directories): +-1 % of ~3 s
IDLE_QUIET_S = 0.15
GAP_S = 0.05


@dataclass(frozen=True)
class Sizes:
    samples: int  # single-file samples per tool and tree
    default_delay_samples: int  # lsyncd at its default delay=15 s (each sample costs 15 s)
    file_size: int
    burst_files: int
    burst_dirs: int
    burst_size: int
    big_files: int
    big_dirs: int
    idle_s: float
    timeout_s: float  # per single-file sample
    # W6 fan-out. Burst files are 4 KB, not 16: 64 targets x 10,000 files live on tmpfs at once.
    fan_n: tuple[int, ...] = (1, 4, 16, 64)
    fan_samples: int = 30
    fan_burst_files: int = 10_000
    fan_burst_dirs: int = 50
    fan_burst_size: int = 4 * 1024
    fan_burst_timeout_s: float = 900.0


FULL = Sizes(30, 3, 64 * 1024, 10_000, 50, 16 * 1024, 100_000, 10_000, 30.0, 60.0)
QUICK = Sizes(
    6, 1, 64 * 1024, 1_000, 10, 16 * 1024, 10_000, 1_000, 5.0, 40.0,
    fan_n=(1, 4), fan_samples=5, fan_burst_files=1_000, fan_burst_dirs=10, fan_burst_timeout_s=180.0,
)  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def seed_tree(src: Path) -> None:
    """An "empty" source: one seed file (the sidecar refuses deletes from an empty source) and ``lat/``."""
    src.mkdir(parents=True)
    (src / "seed.txt").write_text("seed\n")
    (src / "lat").mkdir()


def build_big_tree(src: Path, files: int, dirs: int, progress: Callable[[str], None]) -> list[str]:
    """``dirs`` directories (``t/NNN`` plus ``t/NNN/MMM`` below them), ``files`` small files spread evenly.

    Returns the directories (relative), where W3 drops its files.
    """
    seed_tree(src)
    top = max(1, round(math.sqrt(dirs)))
    per_top = max(0, dirs // top - 1)  # children of each top directory; the top one counts too
    all_dirs: list[Path] = []
    for i in range(top):
        parent = src / "t" / f"{i:03d}"
        parent.mkdir(parents=True)
        all_dirs.append(parent)
        for j in range(per_top):
            child = parent / f"{j:03d}"
            child.mkdir()
            all_dirs.append(child)
    pool = os.urandom(1 << 20)
    per_dir, extra = divmod(files, len(all_dirs))
    n = 0
    for d_index, d in enumerate(all_dirs):
        for k in range(per_dir + (1 if d_index < extra else 0)):
            size = 200 + (n * 37) % 824  # 200..1023 bytes, varied
            off = (n * 4099) % (len(pool) - size)
            with open(d / f"f{k:03d}.dat", "wb") as fh:
                fh.write(pool[off : off + size])
            n += 1
        if d_index % 2000 == 0 and d_index:
            progress(f"  {n} files written")
    return [str(d.relative_to(src)) for d in all_dirs]


def wait_idle(tool: Tool, quiet: float = IDLE_QUIET_S, timeout: float = 600.0) -> None:
    """Wait until no rsync has run in the tool's tree for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    while True:
        now = time.monotonic()
        if tool.busy():
            since = now
        elif now - since >= quiet:
            return
        if now > deadline:
            raise TimeoutError(f"{tool.label} still busy after {timeout:g} s")
        time.sleep(0.02)  # each check scans /proc (~4 ms of CPU): not too often on 2 cores


def _complete(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def single_file(
    tool: Tool, src: Path, dst: Path, n: int, tag: str, size: int, timeout: float, dirs: list[str] | None = None
) -> dict[str, object]:
    """``n`` times: write one new file of ``size`` bytes (open/write/close), time until complete at the target.

    The file goes to ``lat/``, or with ``dirs`` to a directory drawn from it: the same sequence for
    every tool (fixed seed). Where it lands matters for the full-tree loop, whose rsync reaches a
    directory only after walking everything sorted before it.
    """
    latencies: list[float] = []
    lost = 0
    rng = random.Random(1234)
    for i in range(n):
        wait_idle(tool)
        time.sleep(GAP_S)
        rel = f"{rng.choice(dirs) if dirs else 'lat'}/{tag}-{i:03d}.bin"
        data = os.urandom(size)
        target = dst / rel
        t0 = time.perf_counter()
        with open(src / rel, "wb") as fh:
            fh.write(data)
        tool.after_write([rel])
        deadline = t0 + timeout
        while True:
            now = time.perf_counter()
            if _complete(target, data):
                latencies.append(now - t0)
                break
            if now > deadline:
                lost += 1
                break
            time.sleep(POLL_S)
    ms = [x * 1000 for x in latencies]
    return {
        "samples": len(ms),
        "lost": lost,
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "max_ms": round(max(ms), 2) if ms else math.nan,
        "min_ms": round(min(ms), 2) if ms else math.nan,
        "all_ms": [round(x, 2) for x in ms],
    }


def burst_files(files: int, dirs: int, size: int) -> tuple[list[tuple[str, str]], list[bytes], dict[str, set[str]]]:
    """A burst's (directory, name) layout, contents (distinct, each ``size`` bytes) and names per directory,
    made before the clock starts so that only writing them is timed."""
    pool = os.urandom(size + 4096)
    layout = [(f"burst/b{i % dirs:02d}", f"f{i:05d}.bin") for i in range(files)]
    contents = [f"{i:08d}".encode() + pool[i % 4096 : i % 4096 + size - 8] for i in range(files)]
    expected: dict[str, set[str]] = {}
    for d, name in layout:
        expected.setdefault(d, set()).add(name)
    return layout, contents, expected


def write_burst(src: Path, layout: list[tuple[str, str]], contents: list[bytes], expected: dict[str, set[str]]) -> None:
    """Write a burst from :func:`burst_files` into ``src`` as fast as possible."""
    (src / "burst").mkdir()
    for d in expected:
        (src / d).mkdir()
    for (d, name), data in zip(layout, contents, strict=True):
        with open(src / d / name, "wb") as fh:
            fh.write(data)


def burst(tool: Tool, src: Path, dst: Path, files: int, dirs: int, size: int, timeout: float) -> dict[str, object]:
    """Write ``files`` new files into ``dirs`` new directories as fast as possible; time until all are at the target.

    Complete means: every name present at the target (rsync renames a finished temp file into place)
    with the right size; the byte comparison is the tree check that follows.
    """
    wait_idle(tool)
    time.sleep(GAP_S)
    layout, contents, expected = burst_files(files, dirs, size)

    t0 = time.perf_counter()
    write_burst(src, layout, contents, expected)
    written = time.perf_counter()
    floor_rsync = None
    if isinstance(tool, FloorTool):
        floor_rsync = tool.copy_dir("burst")

    missing = {d: set(names) for d, names in expected.items()}
    deadline = t0 + timeout
    done = first = math.nan
    while missing:
        for d in list(missing):
            try:
                present = set(os.listdir(dst / d)) & missing[d]
            except FileNotFoundError:
                continue
            if present and math.isnan(first):
                first = time.perf_counter() - t0
            for name in present:
                try:
                    if os.stat(dst / d / name).st_size == size:
                        missing[d].discard(name)
                except FileNotFoundError:
                    pass
            if not missing[d]:
                del missing[d]
        now = time.perf_counter()
        if not missing:
            done = now - t0
            break
        if now > deadline:
            break
        time.sleep(BURST_POLL_S)
    out: dict[str, object] = {
        "files": files,
        "dirs": dirs,
        "file_size": size,
        "seconds": round(done, 3),
        "write_s": round(written - t0, 3),
        # When the tool started delivering (polling starts once writing is done, so it is never earlier
        # than write_s; meaningless for the floor, whose rsync ran before polling).
        "first_arrival_s": None if floor_rsync is not None else round(first, 3),
        "missing_at_timeout": sum(len(v) for v in missing.values()),
    }
    if floor_rsync is not None:
        out["rsync_s"] = round(floor_rsync, 3)
    return out


def check_tree(tool: Tool, src: Path, dst: Path, settle: float = 10.0) -> dict[str, object]:
    """Byte comparison of both trees once the tool is idle; a late-converging tool gets ``settle`` s more."""
    wait_idle(tool)
    t0 = time.monotonic()
    diff = tree_diff(src, dst)
    late = False
    while diff and time.monotonic() - t0 < settle:
        time.sleep(1.0)
        wait_idle(tool)
        diff = tree_diff(src, dst)
        late = True
    return {"ok": not diff, "differences": len(diff), "examples": diff[:5], "converged_late": late and not diff}


def idle_cpu(tool: Tool, seconds: float) -> dict[str, object]:
    """CPU (user+system, children reaped included) the tool's tree uses over ``seconds`` with nothing changing."""
    wait_idle(tool)
    time.sleep(1.0)  # let start-up leftovers (log flushes, a last status write) settle
    before = cpu_seconds(descendants(tool.roots(), processes()))
    t0 = time.monotonic()
    time.sleep(seconds)
    after = cpu_seconds(descendants(tool.roots(), processes()))
    elapsed = time.monotonic() - t0
    used = max(0.0, after - before)
    return {"seconds": round(elapsed, 1), "cpu_s": round(used, 3), "pct_of_core": round(100 * used / elapsed, 3)}
