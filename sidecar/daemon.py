"""Wire the parts together and run: watcher -> per-target workers -> health/metrics.

Start-up order matters: the watch is in place before the first full sync starts, so a change made
during that sync is either in it or in the next batch. ``/readyz`` turns 200 once the first full
sync reached every target.
"""

from __future__ import annotations

import contextlib
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

from . import logs
from .config import Config, ConfigError
from .guard import GuardError, SourceGuard
from .health import HealthServer
from .metrics import Metrics
from .rsync import Rsync
from .ssh import SshLink, private_key, write_ssh_config
from .targets import Target
from .watcher import Watcher
from .worker import ReportOnce, Worker, WorkerSettings

__all__ = ["Daemon", "Runtime", "resolve"]

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
            max_delete=cfg.max_delete,
            max_pending=cfg.max_pending,
            full_interval_s=cfg.full_sync_interval if cfg.mode != "once" else 0,
            retry_max_s=cfg.retry_max_s,
            write_wait_s=cfg.write_wait_s,
            quiet_s=cfg.quiet_ms / 1000,
            once=cfg.mode == "once",
        )

    # ----- workers -------------------------------------------------------------------------------

    def _add_worker(self, target: Target) -> Worker:
        link = self.runtime.link(self.cfg, target)
        rsync = Rsync(
            self.root, target.rsync_dest(), link.rsync_shell(), self.cfg.chmod, self.cfg.exclude, self.cfg.io_timeout_s
        )
        worker = Worker(target, self.root, link, rsync, self.guard, self.metrics, self.settings, self.reports)
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
            for name in set(self.workers) - set(wanted):
                worker = self.workers.pop(name)
                worker.stop()
                worker.join(timeout=5)
                self.metrics.forget(name)
                log.info("target removed", extra={"fields": {"target": name}})
            for name in sorted(set(wanted) - set(self.workers)):
                self._add_worker(wanted[name])
        self._resolved = True

    def _on_batch(self, changes: dict[str, int], seen_at: float) -> None:
        self.metrics.events.inc(len(changes))
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.submit(changes, seen_at)

    def reconcile(self, reason: str) -> None:
        """Ask every target for a full sync now."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_full(reason)

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
        with self._lock:
            workers = list(self.workers.values())
        watcher_ok = self.watcher is None or (self.watcher.is_alive() and not self.watcher.error)
        workers_ok = all(w.is_alive() for w in workers)
        doc = {
            "alive": watcher_ok and workers_ok,
            "watcher": self._watcher_state(),
            "workers": {w.name_label: w.is_alive() for w in workers},
        }
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
        with self._lock:
            workers = list(self.workers.values())
        return [(w.name_label, w.status()["state"]) for w in workers]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            workers = list(self.workers.values())
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
            "targets": statuses,
        }
        if source_problem:
            doc.update(reason="source_guard", message=source_problem)
        if not statuses and self._resolved:
            doc["note"] = "no target addresses (a dns+ssh:// name resolves to nothing yet)"
        return ok, doc

    # ----- run -----------------------------------------------------------------------------------

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            # Operators (and the stack test) re-resolve targets and reconcile without waiting.
            log.info("SIGHUP: targets re-resolved and a full sync requested")
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
            worker.link.close()
        if self.http is not None:
            self.http.close()
        self.runtime.close()
        self._wakeup.close()
        log.info("stopped")
