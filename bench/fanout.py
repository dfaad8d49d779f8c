"""W6, fan-out: one source replicated to N targets (N = 1, 4, 16, 64), each target its own "host".

The fleet: one sshd per loopback address (127.0.0.2, .3, ...; ``tests/nodes.py``), all on one port,
each with its own target directory and the plain ``/bin/sh`` account of W1-W5. One sshd per address
because OpenSSH binds at most 16 listen sockets, and because that is what N web nodes are: N sshds.

The systems:

* sidecar: one daemon, ``SYNC_TARGETS`` = N ``ssh://`` URLs (one worker and one ``ssh -M`` master each);
* lsyncd: N ``sync{}`` blocks (``default.rsyncssh``, ``delay=0``), each with its own ControlPath: a
  multiplexed master per target (sshd's ``MaxSessions`` is per connection, so N targets cannot share
  one master anyway);
* floor: N ssh masters opened by the benchmark; after each write, N rsyncs of the file started at once.

Measured per system and N, in one run: the single 64 KB file until complete on the first and on
**all** N targets; a burst until every target holds everything; peak RSS of the daemon alone, of the
daemon + its ssh masters, and of the whole tree with rsync children; CPU per file on the sending side
(the tool's tree, reaped rsync/ssh children included) and on the receiving side (the N sshds' trees);
the trees (source = every target) after every workload.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.proc import Proc, RssSampler, cmdline, cpu_seconds, descendants, processes
from bench.tools import FLOOR_RSYNC, SshSetup, stop_sidecar
from bench.workloads import (
    BURST_POLL_S,
    GAP_S,
    IDLE_QUIET_S,
    POLL_S,
    burst_files,
    percentile,
    seed_tree,
    wait_idle,
    write_burst,
)
from tests.helpers import Sidecar, tree
from tests.nodes import Node, start_nodes
from tests.sshd import kill_tree, wait_until

__all__ = ["FAN_TOOLS", "Fleet", "run_fanout"]

FAN_TOOLS = ("floor", "floor_k", "sidecar", "lsyncd")  # the order cells run in, per N
START_TIMEOUT = 300.0  # first sync of a seed tree to 64 targets, with a lot of margin
SAMPLE_INTERVAL = 0.25  # RSS sampler: 65+ processes per sample at N = 64, keep the benchmark's own CPU low


class Fleet:
    """``count`` nodes on 127.0.0.2.., the benchmark's key and host key, one known_hosts for all."""

    def __init__(self, ssh: SshSetup, base: Path, count: int) -> None:
        self.ssh = ssh
        self.base = base
        self.nodes: list[Node] = start_nodes(base / "nodes", ssh.key, ssh.host_key, count, rrsync=False)
        self.known_hosts = base / "fleet_known_hosts"
        self.known_hosts.write_text("".join(n.known_hosts_line() + "\n" for n in self.nodes))
        self.user = self.nodes[0].user
        self.port = self.nodes[0].port

    def make_targets(self, name: str, n: int) -> list[Path]:
        """A fresh directory ``name`` on each of the first ``n`` nodes, owned by the target account."""
        out = []
        for node in self.nodes[:n]:
            path = node.root / name
            if path.exists():
                shutil.rmtree(path)
            path.mkdir()
            shutil.chown(path, node.user, node.user)
            out.append(path)
        return out

    def login(self, i: int) -> str:
        return f"{self.user}@{self.nodes[i].address}"

    def dest(self, i: int, path: Path) -> str:
        return f"{self.login(i)}:{path}/"

    def url(self, i: int, path: Path) -> str:
        return f"ssh://{self.user}@{self.nodes[i].address}:{self.port}{path}"

    def options(self, control: Path) -> dict[str, str]:
        return self.ssh.options(control, self.known_hosts)

    def ssh_args(self, control: Path, **override: str) -> list[str]:
        args = ["ssh", "-i", str(self.ssh.key.private), "-p", str(self.port)]
        for k, v in (self.options(control) | override).items():
            args += ["-o", f"{k}={v}"]
        return args

    def receiver_cpu(self, n: int) -> float:
        """CPU of the first ``n`` sshds' trees: connections, sessions and the remote rsyncs (reaped ones included)."""
        return cpu_seconds(descendants([node.proc.pid for node in self.nodes[:n] if node.proc is not None]))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class FanTool:
    """One system replicating to N targets."""

    key = ""
    label = ""

    def __init__(self, fleet: Fleet, workdir: Path) -> None:
        self.fleet = fleet
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.src: Path | None = None
        self.dsts: list[Path] = []
        self.log_file: Path | None = None

    def describe(self) -> dict[str, object]:
        return {}

    def start(self, src: Path, dsts: list[Path]) -> float:
        """Start on ``src`` -> ``dsts``; returns once the first sync reached every target (its duration)."""
        self.src, self.dsts = src, dsts
        return 0.0

    def stop(self) -> None:
        pass

    def roots(self) -> list[int]:
        return []

    def resident(self, table: dict[int, Proc]) -> dict[str, list[int]]:
        """``{"daemon": [pid], "ssh masters": [pid, ...]}``."""
        return {}

    def busy(self) -> bool:
        return any(p.comm == "rsync" for p in descendants(self.roots()))

    def before_write(self, rels: list[str]) -> None:
        """Called before the workload writes ``rels`` (outside the timed window; only the floor arms)."""

    def after_write(self, rels: list[str]) -> None:
        pass

    def cpu(self) -> float:
        """user+system seconds of the sending side so far (reaped children included)."""
        return cpu_seconds(descendants(self.roots()))

    def daemon_pid(self) -> int | None:
        """The daemon process itself (its own CPU: planning, threads; not its rsync children)."""
        return None

    def own_cpu(self) -> float | None:
        pid = self.daemon_pid()
        p = processes().get(pid) if pid is not None else None
        return (p.utime + p.stime) / os.sysconf("SC_CLK_TCK") if p is not None else None

    def log_tail(self) -> str:
        return ""

    def counters(self) -> dict[str, float]:
        """The tool's own counts where it has any (the sidecar's /metrics)."""
        return {}


def _delta(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    """Counter differences, and per target (the sidecar runs one rsync per batch per target)."""
    out = {k: round(after[k] - before.get(k, 0.0), 1) for k in after}
    out |= {f"{k}_per_target": round(v / n, 1) for k, v in list(out.items())}
    return out


def _ssh_masters(procs: list[Proc], known: dict[int, bool], is_master: Callable[[Proc], bool]) -> list[int]:
    """The ssh masters among ``procs``; each ssh process is classified once (``known`` caches by pid)."""
    out = []
    for p in procs:
        if p.comm != "ssh":
            continue
        if p.pid not in known:
            known[p.pid] = is_master(p)
        if known[p.pid]:
            out.append(p.pid)
    return out


class FanSidecar(FanTool):
    key = "sidecar"
    label = "sidecar"

    def __init__(self, fleet: Fleet, workdir: Path, extra_env: dict[str, str]) -> None:
        super().__init__(fleet, workdir)
        self.extra_env = dict(extra_env)
        self.sc: Sidecar | None = None
        self._known: dict[int, bool] = {}

    def describe(self) -> dict[str, object]:
        return {
            "command": "python -m sidecar (this checkout), SYNC_TARGETS = N ssh:// URLs, one per node",
            "settings": "defaults" + (f"; overrides {self.extra_env}" if self.extra_env else ""),
            "ssh": "one worker and one ssh -M -N ControlMaster per target (its own -F config)",
        }

    def start(self, src: Path, dsts: list[Path]) -> float:
        super().start(src, dsts)
        runtime = self.workdir / "runtime"
        runtime.mkdir(exist_ok=True)
        urls = ",".join(self.fleet.url(i, d) for i, d in enumerate(dsts))
        env = {
            "SYNC_SSH_KNOWN_HOSTS_FILE": str(self.fleet.known_hosts),
            "SYNC_RUNTIME_DIR": str(runtime),
            "SYNC_RETRY_MAX_S": "60",  # tests.helpers.Sidecar sets test values for these two
            "SYNC_SHUTDOWN_GRACE_S": "10",
            **self.extra_env,
        }
        self.sc = Sidecar(src, urls, self.fleet.ssh.key, self.workdir, **env)
        self.log_file = self.sc.log
        self._known = {}
        t0 = time.perf_counter()
        self.sc.start()
        self.sc.wait_ready(timeout=START_TIMEOUT)
        n = len(dsts)
        wait_until(
            lambda: self.sc is not None and self.sc.metric("upsync_syncs_total", kind="full") >= n, 30, "N full syncs"
        )
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.sc is None or self.sc.proc is None:
            return
        stop_sidecar(self.sc, timeout=60)
        self.sc = None

    def roots(self) -> list[int]:
        return [self.sc.proc.pid] if self.sc is not None and self.sc.proc is not None else []

    def daemon_pid(self) -> int | None:
        return self.sc.proc.pid if self.sc is not None and self.sc.proc is not None else None

    def resident(self, table: dict[int, Proc]) -> dict[str, list[int]]:
        roots = self.roots()
        if not roots:
            return {}
        masters = _ssh_masters(descendants(roots, table), self._known, lambda p: "-M" in cmdline(p.pid))
        return {"daemon": roots, "ssh masters": masters}

    def log_tail(self) -> str:
        return self.sc.logs()[-4000:] if self.sc is not None else ""

    def counters(self) -> dict[str, float]:
        """The daemon's own counts, summed over targets: rsync runs by kind, files sent."""
        if self.sc is None:
            return {}
        return {
            "batches": self.sc.metric("upsync_syncs_total", kind="batch"),
            "full_syncs": self.sc.metric("upsync_syncs_total", kind="full"),
            "failed_syncs": self.sc.metric("upsync_syncs_total", status="error"),
            "files_sent": self.sc.metric("upsync_files_sent_total"),
            "files_unchanged": self.sc.metric("upsync_files_unchanged_total"),  # listed, held already: not sent
        }


class FanLsyncd(FanTool):
    """lsyncd 2.2 with one ``default.rsyncssh`` ``sync{}`` block per target, ``delay=0``."""

    key = "lsyncd"
    label = "lsyncd d=0"

    def __init__(self, fleet: Fleet, workdir: Path) -> None:
        super().__init__(fleet, workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "lsyncd.log"
        self.ctl_prefix = ""
        self._known: dict[int, bool] = {}
        self._masters: list[int] = []
        self._cell = 0

    def describe(self) -> dict[str, object]:
        return {
            "command": "lsyncd -nodaemon CONFIG with N sync{} blocks (default.rsyncssh, delay=0), one per node",
            "ssh": "the common -o options with a ControlPath per target (ControlMaster=auto, ControlPersist=600): "
            "one multiplexed master per target, started by its first rsync",
        }

    def config(self, src: Path, dsts: list[Path]) -> str:
        def lua(value: object) -> str:
            return json.dumps(str(value))

        blocks = ["settings { nodaemon = true, insist = false }"]
        for i, dst in enumerate(dsts):
            options = self.fleet.options(Path(f"{self.ctl_prefix}{i}.sock"))
            opts = ", ".join(f"{k} = {lua(v)}" for k, v in options.items())
            host = f"{self.fleet.user}@{self.fleet.nodes[i].address}"
            blocks.append(
                "sync {\n"
                f"  default.rsyncssh, source = {lua(src)}, host = {lua(host)}, targetdir = {lua(dst)}, delay = 0,\n"
                f"  ssh = {{ port = {self.fleet.port}, identityFile = {lua(self.fleet.ssh.key.private)},\n"
                f"          options = {{ {opts} }} }},\n"
                "}"
            )
        return "\n".join(blocks) + "\n"

    def start(self, src: Path, dsts: list[Path]) -> float:
        super().start(src, dsts)
        self._cell += 1
        self.ctl_prefix = str(self.fleet.ssh.ctl / f"l{self._cell}-")  # sun_path is 108 bytes: keep it short
        conf = self.workdir / "lsyncd.lua"
        conf.write_text(self.config(src, dsts))
        self.log.unlink(missing_ok=True)
        self.log_file = self.log
        self._known, self._masters = {}, []
        t0 = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["lsyncd", "-nodaemon", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        n = len(dsts)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"lsyncd exited with {self.proc.returncode}:\n{self.log_tail()}")
            # 'Normal: Startup of "SRC/" finished: 0' (rsyncssh), once per sync{} block
            return len(re.findall(r'Startup of ".*" finished', self.log.read_text(errors="replace"))) >= n

        wait_until(ready, START_TIMEOUT, f"lsyncd's startup syncs to {n} targets", interval=0.05)
        return time.perf_counter() - t0

    def _is_master(self, p: Proc, table: dict[int, Proc]) -> bool:
        # A ControlPersist master is forked off by the first ssh client, daemonizes (its parent is init)
        # and renames itself "ssh: CONTROL_PATH [mux]". rsync's ssh children (mux clients) and lsyncd's
        # own ssh commands (moves, deletes) name the ControlPath too, but their parent is rsync or lsyncd.
        if self.ctl_prefix not in " ".join(cmdline(p.pid)):
            return False
        parent = table.get(p.ppid)
        return parent is None or parent.comm not in ("rsync", "lsyncd")

    def masters(self, table: dict[int, Proc] | None = None) -> list[int]:
        table = processes() if table is None else table
        self._masters = _ssh_masters(list(table.values()), self._known, lambda p: self._is_master(p, table))
        return self._masters

    def roots(self) -> list[int]:
        return ([self.proc.pid] if self.proc is not None else []) + self._masters

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def resident(self, table: dict[int, Proc]) -> dict[str, list[int]]:
        if self.proc is None:
            return {}
        return {"daemon": [self.proc.pid], "ssh masters": self.masters(table)}

    def cpu(self) -> float:
        self.masters()
        return super().cpu()

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
            self.proc = None
        for pid in self.masters():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._masters = []

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class FanFloor(FanTool):
    """N masters opened by the benchmark; after a write, N rsyncs of exactly that file, started at once
    (``parallel=None``) or at most ``parallel`` at a time, the next as soon as one exits."""

    def __init__(self, fleet: Fleet, workdir: Path, parallel: int | None = None) -> None:
        super().__init__(fleet, workdir)
        self.parallel = parallel
        self.key = "floor" if parallel is None else "floor_k"
        self.label = "floor (N rsyncs at once)" if parallel is None else f"floor ({parallel} rsyncs at a time)"
        self._masters: list[subprocess.Popen[bytes]] = []
        self._sockets: list[Path] = []
        self._rsyncs: list[subprocess.Popen[bytes]] = []
        self._workers: list[threading.Thread] = []
        self._armed: list[subprocess.Popen[bytes]] = []
        self._lists = 0
        self._cell = 0

    def describe(self) -> dict[str, object]:
        when = (
            "all started right after close()"
            if self.parallel is None
            else (f"right after close(), at most {self.parallel} running at once (the next starts as one exits)")
        )
        return {
            "command": "N x rsync -e SSH " + " ".join(FLOOR_RSYNC) + f" SRC/ DEST_i, {when}; burst: N plain "
            "rsync -a of the burst directory, started the same way",
            "ssh": "one ssh -M -N ControlMaster per node, opened before the workload",
        }

    def _rsh(self, i: int) -> list[str]:
        return self.fleet.ssh_args(self._sockets[i], ControlMaster="no")

    def start(self, src: Path, dsts: list[Path]) -> float:
        super().start(src, dsts)
        self._cell += 1
        t0 = time.perf_counter()
        self._sockets = [self.fleet.ssh.ctl / f"f{self._cell}-{i}.sock" for i in range(len(dsts))]
        for i, sock in enumerate(self._sockets):
            cmd = [*self.fleet.ssh_args(sock, ControlMaster="yes", ControlPersist="no"), "-N", self.fleet.login(i)]
            self._masters.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True))
        for sock in self._sockets:
            wait_until(sock.exists, 30, f"the floor's master {sock.name}")
        # What the daemons' first sync does: bring every target in line with the seed tree.
        self._start_all(lambda i: ["-a", "--delete", f"{src}/", self.fleet.dest(i, dsts[i])])
        self.finish()
        return time.perf_counter() - t0

    @staticmethod
    def _launch(cmd: list[str], stdin: bytes | None, stdin_pipe: bool = False) -> subprocess.Popen[bytes]:
        # A session of its own for each rsync, as the sidecar starts its rsyncs (sidecar/rsync.py): with
        # the kernel's autogroup on, CPU is shared between sessions first, and 64 rsyncs in the
        # benchmark's one session would get the share of one.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None or stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        return proc

    def _start_all(self, args: Callable[[int], list[str]], stdin: bytes | None = None) -> None:
        self.finish()
        cmds = [["rsync", "-e", " ".join(self._rsh(i)), *args(i)] for i in range(len(self.dsts))]
        if self.parallel is None:
            self._rsyncs = [self._launch(cmd, stdin) for cmd in cmds]
            return
        todo: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        for cmd in cmds:
            todo.put(cmd)

        def work() -> None:
            while True:
                try:
                    cmd = todo.get_nowait()
                except queue.Empty:
                    return
                proc = self._launch(cmd, stdin)
                self._rsyncs.append(proc)
                proc.wait()

        self._workers = [threading.Thread(target=work, daemon=True) for _ in range(min(self.parallel, len(cmds)))]
        for t in self._workers:
            t.start()

    def _arm(self, args: Callable[[int], list[str]]) -> None:
        """N ``sh`` processes, each waiting for one line on stdin before it execs its rsync.

        Started before the write, so "at once" means at once: launching 64 processes one by one from
        this (single-threaded) benchmark takes 0.2 s on an idle machine and seconds on a busy one, as
        each Popen waits for its child's exec; releasing 64 armed processes is 64 pipe writes.
        """
        self.finish()
        self._armed = [
            self._launch(
                ["sh", "-c", 'read -r _ && exec "$@"', "sh", "rsync", "-e", " ".join(self._rsh(i)), *args(i)],
                None,
                stdin_pipe=True,
            )
            for i in range(len(self.dsts))
        ]

    def _fire(self) -> None:
        for proc in self._armed:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        self._rsyncs, self._armed = self._armed, []

    def before_write(self, rels: list[str]) -> None:
        if self.parallel is not None:
            return
        assert self.src is not None
        self._lists += 1
        listing = self.workdir / f"list-{self._lists}"
        listing.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in rels))
        opts = [f"--files-from={listing}" if o == "--files-from=-" else o for o in FLOOR_RSYNC]
        self._arm(lambda i: [*opts, f"{self.src}/", self.fleet.dest(i, self.dsts[i])])

    def after_write(self, rels: list[str]) -> None:
        assert self.src is not None
        if self.parallel is None:
            self._fire()
            return
        listing = b"".join(os.fsencode(r) + b"\0" for r in rels)
        self._start_all(lambda i: [*FLOOR_RSYNC, f"{self.src}/", self.fleet.dest(i, self.dsts[i])], listing)

    def before_burst(self, rel: str) -> None:
        assert self.src is not None
        if self.parallel is None:
            self._arm(lambda i: ["-a", f"{self.src / rel}", self.fleet.dest(i, self.dsts[i])])

    def copy_dir(self, rel: str) -> float:
        """The burst's floor: N plain ``rsync -a`` of ``src/rel`` (armed before the burst, released now; or
        at most ``parallel`` at a time); wall time until all exited."""
        assert self.src is not None
        t0 = time.perf_counter()
        if self.parallel is None:
            self._fire()
        else:
            self._start_all(lambda i: ["-a", f"{self.src / rel}", self.fleet.dest(i, self.dsts[i])])
        self.finish()
        return time.perf_counter() - t0

    def finish(self) -> None:
        for proc in self._armed:  # armed but never released (an interrupted workload)
            proc.kill()
            proc.wait()
        self._armed = []
        for t in self._workers:
            t.join()
        self._workers = []
        procs, self._rsyncs = self._rsyncs, []
        failed = []
        for proc in procs:
            err = proc.stderr.read() if proc.stderr is not None else b""
            if proc.wait() != 0:
                failed.append(f"{proc.returncode}: {err.decode(errors='replace').strip()}")
        if failed:
            raise RuntimeError(f"{len(failed)} floor rsync(s) failed: {failed[:3]}")

    def busy(self) -> bool:
        if any(t.is_alive() for t in self._workers) or any(p.poll() is None for p in self._rsyncs):
            return True
        self.finish()
        return False

    def roots(self) -> list[int]:
        return [m.pid for m in self._masters] + [p.pid for p in list(self._rsyncs)]

    def resident(self, table: dict[int, Proc]) -> dict[str, list[int]]:
        return {"ssh masters": [m.pid for m in self._masters]}

    def cpu(self) -> float:
        # The rsyncs (and their ssh mux clients) are the benchmark's own children: count them as they are reaped.
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime + cpu_seconds(descendants([m.pid for m in self._masters]))

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.finish()
        for m in self._masters:
            kill_tree(m.pid)
            m.wait()
        self._masters = []
        for sock in self._sockets:
            sock.unlink(missing_ok=True)


# ----- workloads -----------------------------------------------------------------------------------


def _summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values_ms, 50), 2),
        "p95_ms": round(percentile(values_ms, 95), 2),
        "max_ms": round(max(values_ms), 2) if values_ms else math.nan,
    }


def fan_single(
    tool: FanTool, src: Path, dsts: list[Path], n: int, tag: str, size: int, timeout: float
) -> dict[str, Any]:
    """``n`` times: one new file of ``size`` bytes; time until complete on the first and on every target.

    Every target still waiting is checked once per pass (stat, then the bytes once the size matches),
    passes ``POLL_S`` apart; a target's time is the pass that first saw its copy complete.
    """
    to_all: list[float] = []
    to_first: list[float] = []
    per_target: list[list[float]] = [[] for _ in dsts]
    lost = 0
    idle_waits: list[float] = []  # how long the previous sample's rsyncs ran on after the last arrival
    for i in range(n):
        w0 = time.perf_counter()
        wait_idle(tool)
        idle_waits.append(round(time.perf_counter() - w0 - IDLE_QUIET_S, 3))
        time.sleep(GAP_S)
        rel = f"lat/{tag}-{i:03d}.bin"
        data = os.urandom(size)
        waiting = dict(enumerate(dsts))
        tool.before_write([rel])
        t0 = time.perf_counter()
        with open(src / rel, "wb") as fh:
            fh.write(data)
        tool.after_write([rel])
        deadline = t0 + timeout
        arrived: dict[int, float] = {}
        while waiting:
            now = time.perf_counter()
            for k, dst in list(waiting.items()):
                try:
                    if (dst / rel).stat().st_size == size and (dst / rel).read_bytes() == data:
                        arrived[k] = now - t0
                        del waiting[k]
                except OSError:
                    pass
            if waiting and now > deadline:
                break
            if waiting:
                time.sleep(POLL_S)
        if waiting:
            lost += 1
            continue
        to_all.append(1000 * max(arrived.values()))
        to_first.append(1000 * min(arrived.values()))
        for k, t in arrived.items():
            per_target[k].append(1000 * t)
    target_p50 = [round(percentile(v, 50), 1) for v in per_target if v]
    return {
        "samples": len(to_all),
        "lost": lost,
        "all": _summary(to_all),
        "first": _summary(to_first),
        "all_ms": [round(x, 1) for x in to_all],
        "first_ms": [round(x, 1) for x in to_first],
        # Fairness between targets: each target's own median, fastest and slowest.
        "target_p50_ms": target_p50,
        "target_p50_spread": round(max(target_p50) / min(target_p50), 2) if target_p50 else None,
        "idle_wait_s": idle_waits,
    }


def fan_burst(
    tool: FanTool, src: Path, dsts: list[Path], files: int, dirs: int, size: int, timeout: float
) -> dict[str, Any]:
    """``files`` new files in ``dirs`` new directories, written as fast as possible; time until every target
    holds every one (name present with its full size; the byte comparison is the tree check that follows).

    Targets are checked one after the other (the next once the current one is complete): the last
    target's completion is what is measured, and polling 64 trees at once would take a core from the
    tools. The resolution is ``BURST_POLL_S`` plus one listing pass of each target still left.
    """
    wait_idle(tool)
    time.sleep(GAP_S)
    layout, contents, expected = burst_files(files, dirs, size)

    if isinstance(tool, FanFloor):
        tool.before_burst("burst")
    t0 = time.perf_counter()
    write_burst(src, layout, contents, expected)
    written = time.perf_counter()
    floor_s = tool.copy_dir("burst") if isinstance(tool, FanFloor) else None  # both floors

    deadline = t0 + timeout
    done: list[float] = []
    missing_total = 0
    timed_out = False
    for dst in dsts:
        missing = {d: set(names) for d, names in expected.items()}
        while missing:
            for d in list(missing):
                try:
                    present = set(os.listdir(dst / d)) & missing[d]
                except FileNotFoundError:
                    continue
                for name in present:
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(dst / d / name).st_size == size:
                            missing[d].discard(name)
                if not missing[d]:
                    del missing[d]
            if not missing:
                done.append(time.perf_counter() - t0)
                break
            if timed_out or time.perf_counter() > deadline:
                timed_out = True
                missing_total += sum(len(v) for v in missing.values())
                break
            time.sleep(BURST_POLL_S)
    out: dict[str, Any] = {
        "files": files,
        "dirs": dirs,
        "file_size": size,
        "seconds": round(max(done), 3) if not timed_out and done else math.nan,
        "write_s": round(written - t0, 3),
        "first_target_confirmed_s": round(done[0], 3) if done else None,
        "missing_at_timeout": missing_total,
        "timeout_s": timeout,
    }
    if floor_s is not None:
        out["rsync_s"] = round(floor_s, 3)
    return out


def check_targets(tool: FanTool, src: Path, dsts: list[Path], settle: float = 10.0) -> dict[str, Any]:
    """Source = every target, byte for byte, once the tool is idle (a late target gets ``settle`` s more)."""
    wait_idle(tool)
    want = tree(src)

    def diff(dst: Path) -> list[str]:
        got = tree(dst)
        return [f"{p!r} on {dst.parent.parent.name}" for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]

    bad: list[str] = []
    late = False
    for dst in dsts:
        d = diff(dst)
        t0 = time.monotonic()
        while d and time.monotonic() - t0 < settle:
            time.sleep(1.0)
            wait_idle(tool)
            d = diff(dst)
            late = True
        bad += d
    return {"ok": not bad, "differences": len(bad), "examples": bad[:5], "converged_late": late and not bad}


# ----- the phase ----------------------------------------------------------------------------------------


def run_cell(
    tool: FanTool,
    fleet: Fleet,
    base: Path,
    n: int,
    sizes: Any,
    say: Callable[[str], None],
    profiled: Callable[[Any, str], contextlib.AbstractContextManager[None]] = lambda *_: contextlib.nullcontext(),
) -> dict[str, Any]:
    """One system at one N: start (sampled from there on), single files, burst, checks; then stopped and removed.
    ``profiled(tool, name)``: a context around the single files (``--profile``: py-spy on the sidecar)."""
    src = base / "src" / f"fan-{tool.key}-n{n}"
    seed_tree(src)
    dsts = fleet.make_targets(f"{tool.key}-n{n}", n)
    res: dict[str, Any] = {}
    sampler = RssSampler(tool.resident, tool.roots, SAMPLE_INTERVAL, with_table=True, tree_pss=True)
    sampler.start()
    try:
        res["startup_s"] = round(tool.start(src, dsts), 2)
        say(f"{tool.label}, N={n}: ready in {res['startup_s']} s; {sizes.fan_samples} single files")
        c0, r0, m0, o0 = tool.cpu(), fleet.receiver_cpu(n), tool.counters(), tool.own_cpu()
        with profiled(tool, f"w6-single-n{n}"):
            single = fan_single(
                tool, src, dsts, sizes.fan_samples, f"{tool.key}-n{n}", sizes.file_size, sizes.timeout_s
            )
        wait_idle(tool)
        c1, r1 = tool.cpu(), fleet.receiver_cpu(n)
        done = max(1, single["samples"])
        single["sender_cpu_ms_per_file"] = round(1000 * (c1 - c0) / done, 1)
        single["receiver_cpu_ms_per_file"] = round(1000 * (r1 - r0) / done, 1)
        if o0 is not None and (o1 := tool.own_cpu()) is not None:
            single["daemon_cpu_ms_per_file"] = round(1000 * (o1 - o0) / done, 1)
        if m0:
            single["counters"] = _delta(tool.counters(), m0, n)
        res["single"] = single
        res["single_check"] = check_targets(tool, src, dsts)
        say(
            f"  to all: p50 {single['all']['p50_ms']} ms, p95 {single['all']['p95_ms']} ms; first: p50 "
            f"{single['first']['p50_ms']} ms; lost {single['lost']}; CPU/file sender "
            f"{single['sender_cpu_ms_per_file']} ms, receivers {single['receiver_cpu_ms_per_file']} ms; trees "
            f"{'equal' if res['single_check']['ok'] else 'DIFFER: ' + str(res['single_check']['examples'])}"
        )
        files = sizes.fan_burst_files
        say(f"{tool.label}, N={n}: burst of {files:,} x {sizes.fan_burst_size // 1024} KB")
        c0, r0, m0, o0 = tool.cpu(), fleet.receiver_cpu(n), tool.counters(), tool.own_cpu()
        burst = fan_burst(tool, src, dsts, files, sizes.fan_burst_dirs, sizes.fan_burst_size, sizes.fan_burst_timeout_s)
        res["burst"] = burst
        if burst["missing_at_timeout"]:
            # Bounded: no CPU figure or tree check for a burst still being delivered; the tool is stopped.
            burst["timed_out"] = True
            sampler.stop()
            res["rss"] = sampler.result()
            say(f"  TIMEOUT after {burst['timeout_s']:g} s: {burst['missing_at_timeout']:,} files still missing")
            return res
        wait_idle(tool, timeout=sizes.fan_burst_timeout_s)
        c1, r1 = tool.cpu(), fleet.receiver_cpu(n)
        burst["sender_cpu_ms_per_file"] = round(1000 * (c1 - c0) / files, 2)
        burst["receiver_cpu_ms_per_file"] = round(1000 * (r1 - r0) / files, 2)
        if o0 is not None and (o1 := tool.own_cpu()) is not None:
            burst["daemon_cpu_ms_per_file"] = round(1000 * (o1 - o0) / files, 2)
        if m0:
            burst["counters"] = _delta(tool.counters(), m0, n)
        res["burst_check"] = check_targets(tool, src, dsts)
        sampler.stop()
        res["rss"] = sampler.result()
        rss = res["rss"]
        say(
            f"  all targets after {burst['seconds']} s; CPU/file "
            f"sender {burst['sender_cpu_ms_per_file']} ms; peak RSS {rss['resident_mb']} MB with masters "
            f"({rss['by_role_mb'].get('daemon', '-')} MB daemon alone, {rss['tree_mb']} MB with rsync children); "
            f"trees {'equal' if res['burst_check']['ok'] else 'DIFFER: ' + str(res['burst_check']['examples'])}"
        )
    finally:
        sampler.stop()
        tool.stop()
        shutil.rmtree(src, ignore_errors=True)
        for d in dsts:
            shutil.rmtree(d, ignore_errors=True)
    return res


def make_tool(key: str, fleet: Fleet, workdir: Path, extra_env: dict[str, str], floor_k: int | None = None) -> FanTool:
    if key == "sidecar":
        return FanSidecar(fleet, workdir, extra_env)
    if key == "lsyncd":
        return FanLsyncd(fleet, workdir)
    if key == "floor":
        return FanFloor(fleet, workdir)
    if key == "floor_k":
        return FanFloor(fleet, workdir, parallel=floor_k or os.cpu_count() or 2)
    raise ValueError(key)


def run_fanout(
    results: dict[str, Any],
    ssh: SshSetup,
    base: Path,
    sizes: Any,
    wanted: list[str],
    extra_env: dict[str, str],
    logs: Path,
    say: Callable[[str], None],
    stack: contextlib.ExitStack,
    floor_k: int | None = None,
    profiled: Callable[[Any, str], contextlib.AbstractContextManager[None]] = lambda *_: contextlib.nullcontext(),
) -> None:
    """W6 for every N in ``sizes.fan_n`` and every wanted system of ``FAN_TOOLS``, N by N (the systems of
    one N run one after the other, close in time). A cell that fails or times out is recorded as such
    and the run goes on."""
    keys = [k for k in FAN_TOOLS if k in wanted]
    if not keys:
        return
    ns = list(sizes.fan_n)
    say(f"W6 fan-out: starting {max(ns)} nodes (one sshd each on 127.0.0.2..127.0.0.{max(ns) + 1})")
    fleet = Fleet(ssh, base / "fleet", max(ns))
    stack.callback(fleet.stop)
    tools = {k: make_tool(k, fleet, base / "work" / f"fan-{k}", extra_env, floor_k) for k in keys}
    out: dict[str, Any] = {
        "n": ns,
        "nodes": f"one sshd per loopback address, port {fleet.port}, plain /bin/sh account, a target directory each",
        "tools": {k: {"label": t.label, **t.describe()} for k, t in tools.items()},
        "cells": {k: {} for k in keys},
    }
    results["fanout"] = out
    for n in ns:
        for key in keys:
            tool = tools[key]
            try:
                cell = run_cell(tool, fleet, base, n, sizes, say, profiled)
            except Exception as exc:  # recorded; the other cells still run
                say(f"  {tool.label}, N={n} FAILED: {exc}")
                if tail := tool.log_tail():
                    say(f"  log tail:\n{tail[-1500:]}")
                cell = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                if tool.log_file is not None and tool.log_file.exists():
                    logs.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(tool.log_file, logs / f"{key}-fanout-n{n}.log")
            out["cells"][key][str(n)] = cell
