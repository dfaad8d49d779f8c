"""The systems under test, behind one small interface, and the loopback sshd they all talk to.

* ``SidecarTool``: ``python -m sidecar`` from this checkout (through ``tests.helpers.Sidecar``).
* ``LsyncdTool``: Debian's lsyncd, ``default.rsyncssh``, with ``delay=0`` or its default (15 s).
* ``LoopTool``: ``fulltree_loop.sh`` (inotifywait -r -m -> rsync -a --delete of the whole tree).
* ``FloorTool``: no watcher at all; the benchmark itself runs one rsync of the changed file right
  after writing it, over an ssh ControlMaster that is already up. Nothing can be faster.

lsyncd, the loop and the floor get the same ssh options (``SshSetup.options``: key, pinned
known_hosts, BatchMode, no compression, a multiplexed ControlPath). The sidecar builds its own ssh
config (``-F`` file, ControlMaster it starts itself); only the key and known_hosts come from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.proc import cmdline, descendants, processes
from tests.helpers import Sidecar
from tests.sshd import KeyPair, SshServer, kill_tree, wait_until

__all__ = ["FloorTool", "LoopTool", "LsyncdTool", "SidecarTool", "SshSetup", "Tool"]

BENCH = Path(__file__).resolve().parent
LOOP_SCRIPT = BENCH / "fulltree_loop.sh"
READY_TIMEOUT = 900.0  # the first full sync of the 100k-file tree by the slowest tool, with margin

# The same rsync options the sidecar uses for one batch (sidecar/rsync.py), so that "sidecar minus
# floor" is detection, batching and Python, not a different rsync.
FLOOR_RSYNC = [
    "--links",
    "--safe-links",
    "--times",
    "--omit-dir-times",
    "--perms",
    "--chmod=D755,F644",
    "--timeout=60",
    "--from0",
    "--files-from=-",
    "--delete-missing-args",
    "--force",
]


class SshSetup:
    """Keys, one plain-shell sshd on 127.0.0.1 (``tests.sshd``, ``rrsync=False``), shared ssh options."""

    def __init__(self, base: Path) -> None:
        keys = base / "keys"
        keys.mkdir(parents=True)
        self.key = KeyPair(keys, "client")
        self.host_key = KeyPair(keys, "host")
        # A plain /bin/sh account, never rrsync (it would add a perl process per transfer) nor root.
        self.server = SshServer(base / "sshd", self.key, self.host_key, rrsync=False)
        self.ctl = base / "ctl"  # control sockets: a short path (sun_path is 108 bytes)
        self.ctl.mkdir(mode=0o700)
        self.master: subprocess.Popen[bytes] | None = None
        self.master_socket = self.ctl / "floor.sock"

    @property
    def known_hosts(self) -> Path:
        return self.server.known_hosts

    def start(self) -> None:
        self.server.start()
        self.start_master()

    def options(self, control_path: Path, known_hosts: Path | None = None) -> dict[str, str]:
        """``-o`` options for lsyncd, the loop and the floor (lsyncd takes them as a table)."""
        return {
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "UserKnownHostsFile": str(known_hosts or self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "GSSAPIAuthentication": "no",  # Debian's ssh_config turns it on; it only slows the handshake
            "Compression": "no",
            "LogLevel": "ERROR",
            "ControlMaster": "auto",
            "ControlPath": str(control_path),
            "ControlPersist": "600",
        }

    def ssh_args(self, control_path: Path, **override: str) -> list[str]:
        opts = self.options(control_path) | override
        args = ["ssh", "-i", str(self.key.private), "-p", str(self.server.port)]
        for k, v in opts.items():
            args += ["-o", f"{k}={v}"]
        return args

    def rsh(self, control_path: Path, **override: str) -> str:
        return shlex.join(self.ssh_args(control_path, **override))

    @property
    def login(self) -> str:
        return f"{self.server.user}@127.0.0.1"

    def dest(self, path: Path) -> str:
        return f"{self.login}:{path}/"

    def make_target(self, name: str) -> Path:
        """A fresh directory under the sshd's root, owned by the target account."""
        path = self.server.root / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        shutil.chown(path, self.server.user, self.server.user)
        return path

    def start_master(self) -> None:
        """The floor's (and the setup copies') ControlMaster, kept up for the whole run."""
        cmd = [*self.ssh_args(self.master_socket, ControlMaster="yes", ControlPersist="no"), "-N", self.login]
        self.master = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.master_socket.exists, 15, "the floor's ssh master")

    def rsync(self, args: list[str], stdin: bytes = b"") -> float:
        """Run rsync over the floor's master; returns its wall time."""
        rsh = self.rsh(self.master_socket, ControlMaster="no")
        start = time.perf_counter()
        proc = subprocess.run(["rsync", "-e", rsh, *args], input=stdin, capture_output=True, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"rsync {args} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        return elapsed

    def stop(self) -> None:
        if self.master is not None:
            kill_tree(self.master.pid)
            self.master.wait()
            self.master = None
        self.server.stop()


def _master_pid(control_path: Path) -> int | None:
    """PID of the (detached, ControlPersist) master behind a control socket."""
    if not control_path.exists():
        return None
    out = subprocess.run(
        ["ssh", "-o", f"ControlPath={control_path}", "-O", "check", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    m = re.search(r"pid=(\d+)", out.stderr + out.stdout)
    return int(m.group(1)) if m else None


def _exit_master(control_path: Path) -> None:
    pid = _master_pid(control_path)
    subprocess.run(
        ["ssh", "-o", f"ControlPath={control_path}", "-O", "exit", "x"], capture_output=True, timeout=10, check=False
    )
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Tool:
    """One system under test. Subclasses start it on (src, dst) and report its processes."""

    key = ""
    label = ""

    def __init__(self, ssh: SshSetup, workdir: Path) -> None:
        self.ssh = ssh
        self.workdir = workdir
        self.src: Path | None = None
        self.dst: Path | None = None
        self.log_file: Path | None = None  # kept after stop(), copied to bench/results/logs/

    def describe(self) -> dict[str, object]:
        """What this tool got (ssh/rsync options, settings), for the JSON and the README."""
        return {}

    def start(self, src: Path, dst: Path) -> float:
        """Start on ``src`` -> ``dst``; returns once the first full sync is done (its duration)."""
        self.src, self.dst = src, dst
        return 0.0

    def stop(self) -> None:
        pass

    def after_write(self, rels: list[str]) -> None:
        """Called right after the workload wrote ``rels`` (only the floor does something)."""

    def roots(self) -> list[int]:
        """Roots of the tool's process tree (children below them are found from /proc)."""
        return []

    def resident(self) -> dict[str, int]:
        """The long-lived processes, by role (their summed RSS is the tool's footprint)."""
        return {}

    def busy(self) -> bool:
        """An rsync is running somewhere in the tool's tree."""
        return any(p.comm == "rsync" for p in descendants(self.roots()))

    def log_tail(self) -> str:
        return ""


def stop_sidecar(sc: Sidecar, timeout: float) -> None:
    """Stop a started sidecar; kill its process tree if it does not stop within ``timeout`` seconds."""
    assert sc.proc is not None
    pid = sc.proc.pid
    try:
        sc.stop(timeout=timeout)
    except Exception:
        kill_tree(pid)
        sc.kill()
    kill_tree(pid)  # its ssh masters if they survived (they run in their own sessions)


class SidecarTool(Tool):
    key = "sidecar"
    label = "sidecar"

    def __init__(self, ssh: SshSetup, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(ssh, workdir)
        self.extra_env = dict(extra_env or {})
        self.sc: Sidecar | None = None
        self._master: int | None = None

    def describe(self) -> dict[str, object]:
        return {
            "command": "python -m sidecar (this checkout)",
            "settings": "defaults (SYNC_QUIET_MS=20, SYNC_MAX_DELAY_MS=500, SYNC_LOG_LEVEL=info)"
            + (f"; overrides {self.extra_env}" if self.extra_env else ""),
            "ssh": "its own -F config and ControlMaster (ssh -M -N); key + known_hosts from the benchmark",
        }

    def start(self, src: Path, dst: Path) -> float:
        super().start(src, dst)
        runtime = self.workdir / "sidecar-runtime"
        runtime.mkdir(exist_ok=True)
        url = f"ssh://{self.ssh.server.user}@127.0.0.1:{self.ssh.server.port}{dst}"
        env = {
            "SYNC_SSH_KNOWN_HOSTS_FILE": str(self.ssh.known_hosts),
            "SYNC_RUNTIME_DIR": str(runtime),
            # tests.helpers.Sidecar sets test values for these two; put the defaults back.
            "SYNC_RETRY_MAX_S": "60",
            "SYNC_SHUTDOWN_GRACE_S": "10",
            **self.extra_env,
        }
        self.sc = Sidecar(src, url, self.ssh.key, self.workdir, **env)
        self.log_file = self.sc.log
        t0 = time.perf_counter()
        self.sc.start()
        self.sc.wait_ready(timeout=READY_TIMEOUT)
        # /readyz turns 200 a moment before the first full sync is counted; wait for the count so
        # metric deltas taken from now on start clean.
        wait_until(lambda: self.metric_sample("upsync_syncs_total", kind="full") >= 1, 10, "the full sync count")
        self._master = None
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.sc is None or self.sc.proc is None:
            return
        stop_sidecar(self.sc, timeout=30)
        self.sc = None

    def roots(self) -> list[int]:
        return [self.sc.proc.pid] if self.sc is not None and self.sc.proc is not None else []

    def resident(self) -> dict[str, int]:
        roots = self.roots()
        if not roots:
            return {}
        table = processes()
        if self._master not in table:
            self._master = next(
                (p.pid for p in descendants(roots, table) if p.comm == "ssh" and "-M" in cmdline(p.pid)), None
            )
        out = {"python": roots[0]}
        if self._master is not None:
            out["ssh master"] = self._master
        return out

    def metric_sample(self, name: str, **labels: str) -> float:
        return self.sc.metric(name, **labels) if self.sc is not None else 0.0

    def log_tail(self) -> str:
        return self.sc.logs()[-4000:] if self.sc is not None else ""


class _PersistentMaster(Tool):
    """A tool whose ssh ``ControlMaster=auto`` + ``ControlPersist`` master detaches from its process tree."""

    def __init__(self, ssh: SshSetup, workdir: Path, control: Path) -> None:
        super().__init__(ssh, workdir)
        self.control = control
        self._master: int | None = None
        self._master_checked = 0.0

    def master_pid(self) -> int | None:
        """Found through its control socket, at most once a second (this runs inside the RSS sampler)."""
        now = time.monotonic()
        if (self._master is None or not Path(f"/proc/{self._master}").exists()) and now - self._master_checked > 1:
            self._master_checked = now
            self._master = _master_pid(self.control)
        return self._master

    # Subclasses run their tool as ``self.proc`` and log to ``self.log``.
    proc: subprocess.Popen[bytes] | None
    log: Path

    def roots(self) -> list[int]:
        out = [self.proc.pid] if self.proc is not None else []
        master = self.master_pid()
        return [*out, master] if master is not None else out

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class LsyncdTool(_PersistentMaster):
    """lsyncd 2.2 ``default.rsyncssh`` (rsync for transfers, ssh for moves and deletes)."""

    def __init__(self, ssh: SshSetup, workdir: Path, delay: int | None, mux: bool = True) -> None:
        key = "lsyncd" if delay == 0 else f"lsyncd_d{delay if delay is not None else 15}"
        if not mux:
            key += "_nomux"
        super().__init__(ssh, workdir, ssh.ctl / f"{key}.sock")
        self.key = key
        self.delay = delay
        # mux=False: lsyncd as its manual configures it, a new ssh connection per rsync (the anchor
        # the issue quoted); mux=True gives it the same multiplexed connection as everyone else.
        self.mux = mux
        self.label = f"lsyncd delay={delay}" if delay is not None else "lsyncd delay=15 (default)"
        if not mux:
            self.label += ", no ssh mux"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.key}.log"

    def config(self, src: Path, dst: Path) -> str:
        def lua(value: object) -> str:
            return json.dumps(str(value))  # a JSON string of plain paths is a valid Lua string

        options = self.ssh.options(self.control)
        if not self.mux:
            options = {k: v for k, v in options.items() if not k.startswith("Control")}
        opts = ", ".join(f"{k} = {lua(v)}" for k, v in options.items())
        delay = "" if self.delay is None else f"delay = {self.delay},"
        return (
            "settings { nodaemon = true, insist = false }\n"
            "sync {\n"
            f"  default.rsyncssh, source = {lua(src)}, host = {lua(self.ssh.login)}, targetdir = {lua(dst)},\n"
            f"  {delay}\n"
            f"  ssh = {{ port = {self.ssh.server.port}, identityFile = {lua(self.ssh.key.private)},\n"
            f"          options = {{ {opts} }} }},\n"
            "}\n"
        )

    def describe(self) -> dict[str, object]:
        return {
            "command": "lsyncd -nodaemon CONFIG (Debian package)",
            "settings": f"default.rsyncssh, delay={self.delay if self.delay is not None else '15 (default)'}, "
            "default rsync options (lsyncd 2.2: -lts + --delete-missing-args/--force/--from0 --files-from)",
            "ssh": (
                "identityFile, port and the common -o options incl. ControlMaster=auto, "
                "ControlPath, ControlPersist=600 (passed to both rsync's --rsh and ssh for moves/deletes)"
                if self.mux
                else "identityFile, port and the common -o options but no ControlMaster: a new ssh "
                "connection per rsync, as lsyncd's manual configures rsyncssh"
            ),
        }

    def start(self, src: Path, dst: Path) -> float:
        super().start(src, dst)
        conf = self.workdir / f"{self.key}.lua"
        conf.write_text(self.config(src, dst))
        self.log_file = self.log
        t0 = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["lsyncd", "-nodaemon", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"lsyncd exited with {self.proc.returncode}:\n{self.log_tail()}")
            text = self.log.read_text(errors="replace")
            return bool(re.search(r'Startup of ".*" finished', text))

        wait_until(ready, READY_TIMEOUT, "lsyncd's startup sync", interval=0.01)
        self._master, self._master_checked = None, 0.0
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
            self.proc = None
        _exit_master(self.control)

    def resident(self) -> dict[str, int]:
        out = {"lsyncd": self.proc.pid} if self.proc is not None else {}
        master = self.master_pid()
        if master is not None:
            out["ssh master"] = master
        return out


class LoopTool(_PersistentMaster):
    key = "loop"
    label = "full-tree loop"

    def __init__(self, ssh: SshSetup, workdir: Path) -> None:
        super().__init__(ssh, workdir, ssh.ctl / "loop.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "loop.log"

    def describe(self) -> dict[str, object]:
        return {
            "command": "bench/fulltree_loop.sh: inotifywait -r -m -e close_write,create,delete,move,attrib "
            "-> rsync -a --delete SRC/ DEST (events queued during a run are coalesced into one more run)",
            "ssh": "rsync -e 'ssh -i KEY -p PORT' + the common -o options incl. ControlMaster=auto, "
            "ControlPath, ControlPersist=600",
        }

    def start(self, src: Path, dst: Path) -> float:
        super().start(src, dst)
        ready = self.workdir / "loop.ready"
        ready.unlink(missing_ok=True)
        self.log_file = self.log
        t0 = time.perf_counter()
        cmd = ["bash", str(LOOP_SCRIPT), str(src), self.ssh.dest(dst), self.ssh.rsh(self.control), str(ready)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the loop exited with {self.proc.returncode}:\n{self.log_tail()}")
            return ready.exists()

        wait_until(up, READY_TIMEOUT, "the loop's first sync", interval=0.01)
        self._master, self._master_checked = None, 0.0
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait()
            self.proc = None
        _exit_master(self.control)

    def resident(self) -> dict[str, int]:
        if self.proc is None:
            return {}
        out = {"bash": self.proc.pid}
        table = processes()
        for p in descendants([self.proc.pid], table):
            if p.comm == "inotifywait":
                out["inotifywait"] = p.pid
        master = self.master_pid()
        if master is not None:
            out["ssh master"] = master
        return out


class FloorTool(Tool):
    """One rsync of exactly the written paths, run by the benchmark right after the write."""

    key = "floor"
    label = "floor (1 rsync, mux up)"

    def __init__(self, ssh: SshSetup, workdir: Path) -> None:
        super().__init__(ssh, workdir)
        self._rsync: subprocess.Popen[bytes] | None = None

    def describe(self) -> dict[str, object]:
        return {
            "command": "rsync -e SSH " + " ".join(FLOOR_RSYNC) + " SRC/ DEST (the sidecar's batch options), "
            "started by the benchmark right after close(); burst: one plain rsync -a of the burst directory",
            "ssh": "an ssh -M -N ControlMaster started once by the benchmark; the common -o options",
        }

    def start(self, src: Path, dst: Path) -> float:
        super().start(src, dst)
        # What the daemons' first full sync does: bring the target in line (seed file, lat/).
        return self.ssh.rsync(["-a", "--delete", f"{src}/", self.ssh.dest(dst)])

    def after_write(self, rels: list[str]) -> None:
        """Start one rsync of ``rels`` and return at once: arrival is polled like for every tool.

        rsync's own exit lags the file's arrival by tens of ms (its wait loops poll in 20 ms steps),
        so timing the command would overstate the floor.
        """
        assert self.src is not None
        assert self.dst is not None
        self.finish()
        listing = b"".join(os.fsencode(r) + b"\0" for r in rels)
        rsh = self.ssh.rsh(self.ssh.master_socket, ControlMaster="no")
        cmd = ["rsync", "-e", rsh, *FLOOR_RSYNC, f"{self.src}/", self.ssh.dest(self.dst)]
        self._rsync = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self._rsync.stdin is not None
        self._rsync.stdin.write(listing)
        self._rsync.stdin.close()

    def finish(self) -> None:
        """Reap the last rsync; fail loudly if it failed."""
        proc, self._rsync = self._rsync, None
        if proc is None:
            return
        err = proc.stderr.read() if proc.stderr is not None else b""
        if proc.wait() != 0:
            raise RuntimeError(f"floor rsync failed ({proc.returncode}): {err.decode(errors='replace')}")

    def stop(self) -> None:
        self.finish()

    def roots(self) -> list[int]:
        return [self.ssh.master.pid] if self.ssh.master is not None else []

    def resident(self) -> dict[str, int]:
        return {"ssh master": self.ssh.master.pid} if self.ssh.master is not None else {}

    def busy(self) -> bool:
        proc = self._rsync
        if proc is not None and proc.poll() is not None:
            self.finish()
            return False
        return proc is not None

    def copy_dir(self, rel: str) -> float:
        """The burst's floor: one plain ``rsync -a`` of ``src/rel`` into the (empty) target; its wall time."""
        assert self.src is not None
        assert self.dst is not None
        return self.ssh.rsync(["-a", f"{self.src / rel}", self.ssh.dest(self.dst)])
