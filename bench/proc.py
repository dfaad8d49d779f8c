"""Read process trees from /proc: resident memory, CPU time, who is running.

Everything here is a point-in-time snapshot of /proc; nothing is cached, because the trees we watch
spawn and reap rsync/ssh children all the time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "Proc",
    "RssSampler",
    "SystemCpu",
    "cmdline",
    "cpu_seconds",
    "descendants",
    "processes",
    "pss_bytes",
    "rss_bytes",
    "system_busy",
]

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    utime: int  # clock ticks
    stime: int
    cutime: int  # reaped children's time, recursively (what finished rsync runs cost)
    cstime: int
    rss_pages: int


def _read_stat(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    head, _, tail = text.rpartition(")")
    comm = head.partition("(")[2]
    f = tail.split()
    try:
        # f[0] is field 3 (state) of proc(5): field n is f[n - 3].
        return Proc(pid, int(f[1]), comm, int(f[11]), int(f[12]), int(f[13]), int(f[14]), int(f[21]))
    except (IndexError, ValueError):
        return None


def processes() -> dict[int, Proc]:
    """Every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (p := _read_stat(int(entry))) is not None:
            out[p.pid] = p
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def descendants(roots: Iterable[int], table: dict[int, Proc] | None = None) -> list[Proc]:
    """The given processes and all their descendants (those that still exist)."""
    table = processes() if table is None else table
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    seen: dict[int, Proc] = {}
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen[pid] = table[pid]
        todo.extend(children.get(pid, []))
    return list(seen.values())


def rss_bytes(procs: Iterable[Proc]) -> int:
    """Summed resident set (shared pages count once per process, as ``ps`` shows them)."""
    return sum(p.rss_pages for p in procs) * _PAGE


def pss_bytes(pid: int) -> tuple[int, int, int]:
    """(PSS, anonymous, USS) bytes of one process from smaps_rollup (zeros if it is gone).

    RSS counts every shared-library page a process has touched in full, in each process; PSS splits
    shared pages between their users; USS (private clean + dirty) is what the process alone holds,
    i.e. what one more such process costs. That matters for ssh masters: a ControlPersist master is a
    fork and shows ~4 MB less RSS than an ``ssh -M -N`` one for the same memory.
    """
    pss = anon = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Anonymous:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, anon, uss


def cpu_seconds(procs: Iterable[Proc]) -> float:
    """user+system time of the processes plus that of the children they have reaped."""
    return sum(p.utime + p.stime + p.cutime + p.cstime for p in procs) / _TICK


Pids = int | list[int]


class RssSampler(threading.Thread):
    """Samples a tool every ``interval`` s and keeps the peaks.

    Args:
        resident: the tool's long-lived processes by role (``{"python": pid, "ssh master": pid}``; a role
            may hold several processes, e.g. ``{"ssh masters": [pid, ...]}``: their sum is the role's size).
            Called with the process table of the sample when it accepts one argument (``table=...``).
        roots: the roots of its whole tree (transient rsync/ssh children included below them).
    """

    def __init__(
        self,
        resident: Callable[..., dict[str, Pids]],
        roots: Callable[[], list[int]],
        interval: float = 0.1,
        with_table: bool = False,
        tree_pss: bool = False,
    ) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._resident = resident
        self._roots = roots
        self._with_table = with_table  # resident(table): one /proc scan per sample instead of two
        # Also the PSS of the whole tree (rsync children included): RSS counts the pages 64 rsyncs share
        # (binary, libraries) 64 times. One smaps_rollup read per process and sample: W6 only.
        self._tree_pss = tree_pss
        self.peak_tree_pss = 0
        self.interval = interval
        self.peak_resident = 0  # peak of the sum over the long-lived processes
        self.peak_tree = 0  # peak of the whole tree, transient children included
        self.peak_by_role: dict[str, int] = {}
        self.peak_pss_by_role: dict[str, int] = {}
        self.peak_uss_by_role: dict[str, int] = {}
        self.peak_count_by_role: dict[str, int] = {}
        self.peak_pss = 0  # peak of the summed PSS of the long-lived processes
        self.peak_anon = 0  # ... and of their anonymous (private, heap) memory
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        table = processes()
        total = total_pss = total_anon = 0
        roles = self._resident(table) if self._with_table else self._resident()
        for role, pids in roles.items():
            alive = [p for p in ([pids] if isinstance(pids, int) else pids) if p in table]
            rss = rss_bytes([table[p] for p in alive])
            role_pss = role_uss = 0
            for pid in alive:
                pss, anon, uss = pss_bytes(pid)
                role_pss += pss
                role_uss += uss
                total_anon += anon
            total += rss
            total_pss += role_pss
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)
            self.peak_pss_by_role[role] = max(self.peak_pss_by_role.get(role, 0), role_pss)
            self.peak_uss_by_role[role] = max(self.peak_uss_by_role.get(role, 0), role_uss)
            self.peak_count_by_role[role] = max(self.peak_count_by_role.get(role, 0), len(alive))
        self.peak_resident = max(self.peak_resident, total)
        self.peak_pss = max(self.peak_pss, total_pss)
        self.peak_anon = max(self.peak_anon, total_anon)
        tree = descendants(self._roots(), table)
        self.peak_tree = max(self.peak_tree, rss_bytes(tree))
        if self._tree_pss:
            self.peak_tree_pss = max(self.peak_tree_pss, sum(pss_bytes(p.pid)[0] for p in tree))
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()  # at least one sample even for very short runs

    def result(self) -> dict[str, object]:
        mb = 1024 * 1024
        return {
            "resident_mb": round(self.peak_resident / mb, 1),
            "tree_mb": round(self.peak_tree / mb, 1),
            **({"tree_pss_mb": round(self.peak_tree_pss / mb, 1)} if self._tree_pss else {}),
            "pss_mb": round(self.peak_pss / mb, 1),
            "anon_mb": round(self.peak_anon / mb, 1),
            "by_role_mb": {k: round(v / mb, 1) for k, v in self.peak_by_role.items()},
            "by_role_pss_mb": {k: round(v / mb, 1) for k, v in self.peak_pss_by_role.items()},
            "by_role_uss_mb": {k: round(v / mb, 1) for k, v in self.peak_uss_by_role.items()},
            "by_role_count": dict(self.peak_count_by_role),
            "samples": self.samples,
        }


class SystemCpu:
    """Whole-machine CPU counters from /proc/stat (all cores), to show how busy the box was."""

    def __init__(self) -> None:
        with open("/proc/stat", encoding="ascii") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal
        self.idle = f[3] + f[4]
        self.steal = f[7] if len(f) > 7 else 0
        self.total = sum(f[:8])

    def since(self, before: SystemCpu) -> dict[str, float]:
        total = max(1, self.total - before.total)
        busy = total - (self.idle - before.idle) - (self.steal - before.steal)
        return {
            "busy_pct": round(100 * busy / total, 1),
            "steal_pct": round(100 * (self.steal - before.steal) / total, 1),
        }


def system_busy(seconds: float) -> dict[str, float]:
    """How busy the machine is while we do nothing (other people's processes: noise in our numbers)."""
    before = SystemCpu()
    time.sleep(seconds)
    return SystemCpu().since(before)
