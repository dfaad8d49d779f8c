"""Wire the parts together and run: watcher -> shared plans -> per-target workers -> health/metrics.

Start-up order matters: the watch is in place before the first full sync starts, so a change made
during that sync is either in it or in the next batch. ``/readyz`` turns 200 once the first full
sync reached every target.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__, logs
from .config import Config, ConfigError
from .control import ControlServer
from .filters import Excludes
from .guard import GuardError, SourceGuard
from .health import HealthServer
from .hooks import Hooks, make_hooks
from .metrics import Metrics
from .plan import Planner, SharedPlans
from .policy import DeleteLimits
from .rsync import PARTIAL_DIR, Rsync, Slots
from .sandbox import SandboxError, SourceSandbox, find_helper
from .scan import SharedScan
from .ssh import SshLink, private_key, write_ssh_config
from .targets import Target
from .transport import Transport
from .watcher import Watcher
from .worker import ReportOnce, Worker, WorkerSettings

__all__ = ["Daemon", "Runtime", "make_sandbox", "resolve"]

log = logs.get("daemon")


def resolve(target: Target) -> list[Target]:
    """The concrete targets of a ``dns+ssh://`` target (one per address), or ``[target]``.

    Raises:
        OSError: the name does not resolve.
    """
    if not target.resolve_all:
        return [target]
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [target.expand(address) for address in addresses]


def _remove_stale(base: Path) -> None:
    """Remove runtime directories of daemons that were killed (SIGKILL leaves them behind)."""
    for entry in base.glob("upsync-*/pid"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            pid = int(entry.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry.parent, ignore_errors=True)


class Runtime:
    """The private runtime directory: ssh config, control sockets, key copy. Removed on close."""

    def __init__(self, cfg: Config) -> None:
        base = str(cfg.runtime_dir) if cfg.runtime_dir else None
        self.dir = Path(tempfile.mkdtemp(prefix="upsync-", dir=base))  # mode 0700
        (self.dir / "pid").write_text(f"{os.getpid()}\n")
        _remove_stale(self.dir.parent)
        self.key = private_key(cfg.ssh_key_file, self.dir)
        self.known_hosts = cfg.ssh_known_hosts_file.resolve()
        self.ssh_config = write_ssh_config(
            self.dir, self.key.resolve(), self.known_hosts, cfg.ssh_host_key_policy, cfg.ssh_connect_timeout_s
        )
        self._n = 0
        self._lock = threading.Lock()

    def link(self, cfg: Config, target: Target) -> SshLink:
        with self._lock:
            self._n += 1
            sock = self.dir / f"c{self._n}.sock"
        return SshLink(target, self.ssh_config, sock, cfg.ssh_connect_timeout_s, self.known_hosts, cfg.ssh_key_file)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make_sandbox(cfg: Config, root: str, runtime: Runtime) -> SourceSandbox | None:
    """The sender's sandbox as ``SYNC_SANDBOX`` asks (None: off, or unavailable with ``auto``).

    Raises:
        SandboxError: ``required`` and the kernel offers none.
    """
    if cfg.sandbox == "off":
        return None
    try:
        sandbox = SourceSandbox(root, [runtime.ssh_config], helper=find_helper())
    except SandboxError as exc:
        if cfg.sandbox == "required":
            raise
        log.warning(
            "no sandbox for the rsync sender: between planning and sending, a path swapped for a symlink can "
            "make rsync read outside SYNC_SOURCE (see docs/security.md); SYNC_SANDBOX=required refuses to run so",
            extra={"fields": {"why": str(exc)}},
        )
        return None
    if sandbox.helper is None:
        log.info(
            "sandbox applied without its exec helper (upsync-landlock): each rsync start costs a full fork of the "
            "daemon (~10 ms of CPU); tests/run.sh and the image build it"
        )
    return sandbox


RUNS_PER_CORE = 8


def parallel_runs(setting: int) -> int:
    """``SYNC_MAX_PARALLEL``: 0 means eight per CPU core.

    A single-file rsync is mostly waiting (ssh round trips, rsync's 20 ms poll steps), not CPU: measured with
    the sidecar on 2 cores (bench W6, 2026-12-02), all-targets p50 with 4 / 8 / 16 runs at once was 393 / 331 /
    314 ms for 16 targets and 1,662 / 1,372 / 1,280 ms for 64; the floor's sweep was flat from 4 per core up.
    """
    return setting or RUNS_PER_CORE * (os.cpu_count() or 1)


class Waker:
    """Wakes the main thread from any thread, and on any signal.

    The kernel may deliver a signal to any thread, but Python runs its handler only in the main thread
    once that thread executes Python code again; blocked in a wait it would not. ``set_wakeup_fd`` makes
    the signal itself write to this socket pair, so the main thread's ``select`` returns at once.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._installed = False

    def install_for_signals(self) -> None:
        """Main thread only: every signal also writes a byte here."""
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._installed = True

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._w.send(b"\0")

    def wait(self, timeout: float) -> None:
        select.select([self._r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        if self._installed:
            signal.set_wakeup_fd(-1)
        self._r.close()
        self._w.close()


class Daemon:
    """One run of the sidecar in ``watch``, ``interval`` or ``once`` mode.

    Args:
        cfg: validated configuration (the source has been checked to exist).
        http_addr: overrides ``cfg.http_addr`` (tests use port 0).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = os.path.realpath(cfg.source)
        self.metrics = Metrics()
        self.guard = SourceGuard(self.root)
        self.reports = ReportOnce()
        self.runtime = Runtime(cfg)
        try:
            self.sandbox = make_sandbox(cfg, self.root, self.runtime)
        except BaseException:
            self.runtime.close()
            raise
        self.excludes = Excludes(cfg.exclude)
        # The planner and the scan also skip the reserved partial directory (SYNC_RESUME, perhaps upstream's:
        # the fanout reads content's copy); rsync's own runs hide it with a perishable rule instead.
        reserved = Excludes((*cfg.exclude, f"{PARTIAL_DIR}/"))
        self.planner = Planner(self.root, reserved, limit=cfg.max_pending)
        self.plans = SharedPlans(self.planner, counted=lambda kind: self.metrics.plans.labels(kind).inc())
        self.scans = SharedScan(self.root, reserved)
        self.hooks: Hooks | None = None  # made in run(): reading the webhook secret may fail
        self.slots = Slots(parallel_runs(cfg.max_parallel))
        self._batches = itertools.count(1)
        self._probe_warned = False
        self.control: ControlServer | None = None
        self.workers: dict[str, Worker] = {}
        self.watcher: Watcher | None = None
        self.http: HealthServer | None = None
        self._stop = threading.Event()
        self._wakeup = Waker()  # set by signals and fatal errors: the main loop looks again
        self._hup = False
        self._resolved = False  # targets looked up (and workers started) at least once
        self._fatal: str | None = None
        self._lock = threading.Lock()
        self.metrics.full_sync_interval.set(cfg.full_sync_interval if cfg.mode != "once" else 0)
        self.metrics.set_readiness(lambda: self.ready()[0], self._states)
        self.settings = WorkerSettings(
            delete=cfg.delete,
            limits=DeleteLimits(cfg.max_delete, cfg.max_delete_percent),
            max_pending=cfg.max_pending,
            full_interval_s=cfg.full_sync_interval if cfg.mode != "once" else 0,
            retry_max_s=cfg.retry_max_s,
            write_wait_s=cfg.write_wait_s,
            quiet_s=cfg.quiet_ms / 1000,
            unhealthy_after_s=cfg.unhealthy_after_s,
            once=cfg.mode == "once",
            progress_interval_s=cfg.progress_interval_s,
        )

    # ----- workers -------------------------------------------------------------------------------

    def _add_worker(self, target: Target) -> Worker:
        cfg = self.cfg
        link = self.runtime.link(cfg, target)
        rsync = Rsync(
            self.root,
            target.rsync_dest(),
            link.rsync_shell(),
            cfg.chmod,
            self.excludes,
            cfg.io_timeout_s,
            confine=self.sandbox.confinement if self.sandbox else None,
            slots=self.slots,
            bwlimit=cfg.bwlimit,
            resume=cfg.resume,
            itemize=self.hooks is not None,
        )
        transport = Transport(target, link, rsync, self.runtime.dir)
        worker = Worker(
            transport, self.plans, self.scans, self.guard, self.metrics, self.settings, self.reports, self.hooks
        )
        transport.on_skipped = worker.report_skipped
        self.workers[target.name] = worker
        worker.start()
        log.info("target added", extra={"fields": {"target": target.name}})
        return worker

    def _sync_targets(self) -> None:
        """(Re-)resolve ``dns+ssh://`` targets: start workers for new addresses, stop gone ones."""
        wanted: dict[str, Target] = {}
        for target in self.cfg.targets:
            try:
                for concrete in resolve(target):
                    wanted[concrete.name] = concrete
            except OSError as exc:
                # Keep what we have: a DNS hiccup must not drop web nodes.
                log.warning(
                    "cannot resolve target; keeping its current addresses",
                    extra={"fields": {"target": target.name, "error": str(exc)}},
                )
                wanted.update({n: w.target for n, w in self.workers.items() if w.target.host_key_alias == target.host})
        with self._lock:
            gone = [self.workers.pop(name) for name in set(self.workers) - set(wanted)]
            for name in sorted(set(wanted) - set(self.workers)):
                self._add_worker(wanted[name])
        # Outside the lock: a worker stuck in a transfer must not block health checks and the watcher.
        for worker in gone:
            worker.stop()
        for worker in gone:
            worker.join(timeout=5)
            self.metrics.forget(worker.name_label)
            log.info("target removed", extra={"fields": {"target": worker.name_label}})
        self._resolved = True

    def _on_batch(self, changes: dict[str, int], seen_at: float) -> None:
        self.metrics.events.inc(len(changes))
        batch = next(self._batches)  # one plan per batch, shared by every target (SharedPlans)
        for worker in self._workers():
            worker.submit(changes, seen_at, batch)
        if self.planner.probe_unsupported and not self._probe_warned:
            self._probe_warned = True
            log.warning(
                "cannot tell whether files are still being written (not their owner, no CAP_LEASE); a file "
                "written slowly may reach the target before it is complete — run as the uploads' owner uid"
            )

    def _workers(self) -> list[Worker]:
        with self._lock:
            return list(self.workers.values())

    def reconcile(self, reason: str) -> None:
        """Ask every target for a full sync now, of the tree as it is from now on (events may have been lost, or
        an operator asks): no scan made before may serve it."""
        at = time.monotonic()
        for worker in self._workers():
            worker.request_full(reason, at)

    def retry_fatal(self, why: str) -> list[str]:
        """Try the targets that needed the operator again; returns their names."""
        return [w.name_label for w in self._workers() if w.retry_fatal(why)]

    def _on_lost(self, reason: str) -> None:
        log.warning("events may have been lost; full sync requested", extra={"fields": {"why": reason}})
        self.metrics.watcher_restarts.labels("lost").inc()
        self.reconcile(reason)

    def _on_fatal(self, message: str) -> None:
        log.error("cannot watch the source", extra={"fields": {"error": message}})
        self._fatal = message
        self._stop.set()
        self._wakeup.set()

    # ----- health --------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: the watcher and every worker alive, and no target needing the operator or failing
        for longer than ``SYNC_UNHEALTHY_AFTER_S`` (see :func:`sidecar.policy.unhealthy`)."""
        workers = self._workers()
        watcher_ok = self.watcher is None or (self.watcher.is_alive() and not self.watcher.error)
        problems = {w.name_label: p for w in workers if (p := w.health_problem())}
        problems.update({w.name_label: "worker thread stopped" for w in workers if not w.is_alive()})
        doc: dict[str, Any] = {
            "alive": watcher_ok and not problems,
            "watcher": self._watcher_state(),
            "workers": {w.name_label: w.is_alive() for w in workers},
        }
        if problems:
            doc["unhealthy"] = problems
        return bool(doc["alive"]), doc

    def _watcher_state(self) -> str:
        if self.watcher is None:
            return "off" if self.cfg.mode != "watch" else "starting"
        if self.watcher.error:
            return "failed"
        if not self.watcher.is_alive():
            return "stopped"
        return "polling" if self.watcher.polling else "inotify"

    def _states(self) -> list[tuple[str, str]]:
        return [(w.name_label, w.state) for w in self._workers()]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        workers = self._workers()
        statuses = [w.status() for w in workers]
        watcher_ok = self.cfg.mode != "watch" or (
            self.watcher is not None and self.watcher.started.is_set() and not self.watcher.error
        )
        try:
            self.guard.check()  # cheap (stat + mount ID): a vanished source shows even when no event arrives
            source_problem = ""
        except GuardError as exc:
            source_problem = str(exc)
        # No worker yet is "not ready", unless every target is a name that resolves to nothing now.
        targets_ok = self._resolved and (bool(statuses) or all(t.resolve_all for t in self.cfg.targets))
        ok = (
            watcher_ok
            and targets_ok
            and not source_problem
            and all(s["ready"] for s in statuses)
            and not self._stop.is_set()
        )
        doc: dict[str, Any] = {
            "ready": ok,
            "mode": self.cfg.mode,
            "source": self.root,
            "watcher": self._watcher_state(),
            "sandbox": self.sandbox is not None,
            "targets": statuses,
        }
        if source_problem:
            doc.update(reason="source_guard", message=source_problem)
        if not statuses and self._resolved:
            doc["note"] = "no target addresses (a dns+ssh:// name resolves to nothing yet)"
        return ok, doc

    # ----- the operator's commands (control socket) ------------------------------------------------

    def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            _, doc = self.ready()
            alive, health = self.health()
            doc["alive"] = alive
            if "unhealthy" in health:
                doc["unhealthy"] = health["unhealthy"]
            for target in doc["targets"]:
                target["latency_p95_s"] = self.metrics.latency_quantile(target["target"], 0.95)
                target["delete_guard"] = target["state"] == "delete_guard"
            return {"ok": True, **doc}
        if cmd == "approve":
            deletes, name = req.get("deletes"), req.get("target")
            if not isinstance(deletes, int) or deletes < 1:
                return {"ok": False, "error": "deletes must be a whole number of at least 1"}
            chosen = [w for w in self._workers() if name in (None, w.name_label)]
            if not chosen:
                return {"ok": False, "error": f"no target {name}; `python -m sidecar status` lists them"}
            for worker in chosen:
                worker.approve(deletes)
            log.warning(
                "operator approved deletes for the next full sync",
                extra={"fields": {"deletes": deletes, "targets": ",".join(w.name_label for w in chosen)}},
            )
            return {"ok": True, "approved": deletes, "targets": [w.name_label for w in chosen]}
        if cmd == "retry":
            return {"ok": True, "retried": self.retry_fatal("a passing check")}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ----- run -----------------------------------------------------------------------------------

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            # Operators (and the stack test) re-resolve targets and reconcile without waiting.
            log.info("SIGHUP: targets re-resolved, a full sync requested, targets that needed the operator retried")
            self._hup = True
            self._wakeup.set()
            return
        log.info("signal received; flushing and stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        self._stop.set()
        self._wakeup.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (``watch``, ``interval``) or until the full sync ends (``once``).

        Returns:
            The exit code: 0, or 1 when ``once`` failed or watching became impossible.
        """
        cfg = self.cfg
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._signal)
            signal.signal(signal.SIGINT, self._signal)
            signal.signal(signal.SIGHUP, self._signal)
            # A writer opening a file while the busy-file probe holds its lease makes the kernel send SIGIO,
            # whose default action kills the process (a plugin appending to a log in the uploads did).
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            self._wakeup.install_for_signals()
        log.info(
            "starting",
            extra={
                "fields": {
                    "mode": cfg.mode,
                    "source": self.root,
                    "targets": ",".join(t.name for t in cfg.targets),
                    "delete": cfg.delete,
                    "quiet_ms": cfg.quiet_ms,
                    "max_delay_ms": cfg.max_delay_ms,
                }
            },
        )
        try:
            self.hooks = make_hooks(cfg, self.root, self.metrics)
            if self.hooks is not None:
                log.info("hooks", extra={"fields": {"hooks": ",".join(r.sink.name for r in self.hooks.runners)}})
            if cfg.http_addr and cfg.mode != "once":
                try:
                    self.http = HealthServer(cfg.http_addr, self.health, self.ready, self.metrics.registry)
                except OSError as exc:
                    host, port = cfg.http_addr
                    raise ConfigError(
                        f'invalid SYNC_HTTP_ADDR="{host}:{port}": must be an address this process '
                        f"can listen on ({exc.strerror}); pick another port or empty to disable"
                    ) from None
                self.http.start()
            if cfg.mode != "once":
                self.control = ControlServer(
                    self.runtime.dir,
                    self._control,
                    {"pid": os.getpid(), "source": self.root, "version": __version__},
                )
                self.control.start()
            if cfg.mode == "watch":
                self.watcher = Watcher(
                    self.root,
                    quiet_ms=cfg.quiet_ms,
                    max_delay_ms=cfg.max_delay_ms,
                    backend=cfg.watch_backend,
                    poll_interval_ms=cfg.poll_interval_ms,
                    on_batch=self._on_batch,
                    on_lost=self._on_lost,
                    on_fatal=self._on_fatal,
                )
                self.watcher.start()
                # The watch must be in place before the first full sync starts.
                while not self.watcher.started.wait(0.1):
                    if self._stop.is_set() or not self.watcher.is_alive():
                        break
            if not self._stop.is_set():
                self._sync_targets()
            return self._main_loop()
        finally:
            self._shutdown()

    def _main_loop(self) -> int:
        has_dns = any(t.resolve_all for t in self.cfg.targets)
        next_resolve = time.monotonic() + self.cfg.resolve_interval_s
        while True:
            timeout = max(0.05, next_resolve - time.monotonic()) if has_dns else 3600.0
            if self.cfg.mode == "once":
                timeout = 0.2
            self._wakeup.wait(timeout)
            if self._stop.is_set():
                break
            if self._hup:
                self._hup = False
                if has_dns:
                    self._sync_targets()
                    next_resolve = time.monotonic() + self.cfg.resolve_interval_s
                self.retry_fatal("SIGHUP")
                self.reconcile("SIGHUP")
            if self.cfg.mode == "once":
                with self._lock:
                    workers = list(self.workers.values())
                if all(not w.is_alive() for w in workers):
                    ok = all(w.result for w in workers)
                    return 0 if ok else 1
            if has_dns and time.monotonic() >= next_resolve:
                self._sync_targets()
                next_resolve = time.monotonic() + self.cfg.resolve_interval_s
        return 1 if self._fatal else 0

    def _shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.join(timeout=3)  # hands over the last batch it saw
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.drain(deadline)
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                worker.stop()
                worker.join(timeout=3)
            left = worker.pending_count
            if self.cfg.mode != "once" and (left or worker.full_sync_pending):
                log.warning(
                    "not delivered before shutdown; the full sync at the next start covers it",
                    extra={"fields": {"target": worker.name_label, "paths": left}},
                )
            worker.transport.link.close()
        if self.hooks is not None:
            # After the workers: their last syncs are reported too (within the grace, at least a second).
            self.hooks.close(max(deadline, time.monotonic() + 1.0))
        if self.http is not None:
            self.http.close()
        if self.control is not None:
            self.control.close()
        if self.sandbox is not None:
            self.sandbox.close()
        self.runtime.close()
        self._wakeup.close()
        log.info("stopped")
