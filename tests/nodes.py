"""Many ssh "hosts" on one machine: one sshd per loopback address (127.0.0.2, .3, ...), all on one port.

Each :class:`Node` is its own host as far as the daemon can tell: its own address, its own sshd and
its own target directory, so a node can be stopped, paused (SIGSTOP) or cut off by a firewall rule
without touching the others, and a ``dns+ssh://`` name can resolve to several of them (one port for
all, as in a real fleet). Only loopback addresses are used.

Why one sshd per address rather than one sshd listening on all of them: OpenSSH binds at most 16
listen sockets (``MAX_LISTEN_SOCKS`` in sshd.c; a 17th ``ListenAddress`` is refused at start), and a
node must be able to fail alone.

:class:`NetNs` is a network namespace the caller creates: loopback of its own (so ``iptables`` rules
there drop packets of one node without touching the machine's firewall) and, through ``ip netns
exec``, an ``/etc/hosts`` of its own (``/etc/netns/NAME/hosts`` is bind-mounted over ``/etc/hosts``
for every process started in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.faults.faultlib import PrefixedSidecar
from tests.sshd import SSHD, KeyPair, SshServer, free_port, kill_tree, wait_until

__all__ = ["NetNs", "Node", "NsSidecar", "node_address", "pick_port", "start_nodes"]

MAX_NODES = 250


def node_address(index: int) -> str:
    """The loopback address of node ``index`` (0 -> 127.0.0.2; 127.0.0.1 stays the machine's own)."""
    if not 0 <= index < MAX_NODES:
        raise ValueError(f"node index {index} out of 0..{MAX_NODES - 1}")
    return f"127.0.0.{index + 2}"


def pick_port(addresses: list[str], tries: int = 20) -> int:
    """A TCP port free on every one of ``addresses`` (checked by binding each once)."""
    for _ in range(tries):
        port = free_port()
        ok = True
        for address in addresses:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {len(addresses)} loopback addresses after {tries} tries")


class NetNs:
    """A network namespace of our own (``ip netns``), removed with everything in it on :meth:`delete`.

    Args:
        name: unique on this machine (``upsync-<something>-<pid>``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name
        self._made_etc_netns = False
        self.created = False

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside (``ip`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> NetNs:
        if not Path("/etc/netns").exists():
            self._made_etc_netns = True
        self.etc.mkdir(parents=True, exist_ok=True)
        # Files must exist before a process starts: `ip netns exec` bind-mounts them at exec time.
        self.write_hosts({})
        # glibc returns every address of a name listed several times only with "multi on"
        # (getaddrinfo with "multi off" gives the first line alone; checked on glibc 2.36).
        (self.etc / "host.conf").write_text("multi on\n")
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.created = True
        self.run("ip", "link", "set", "lo", "up")
        return self

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in netns {self.name} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def write_hosts(self, names: dict[str, list[str]]) -> None:
        """``/etc/hosts`` inside: each name on one line per address.

        Rewritten in place (same inode): running processes see the bind-mounted file change.
        """
        lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for name, addrs in names.items() for addr in addrs]
        with open(self.etc / "hosts", "w", encoding="ascii") as fh:
            fh.write("\n".join(lines) + "\n")

    def _rules(self, flag: str, address: str) -> None:
        # Both directions: packets to the node and its answers (loopback traffic passes INPUT once each way).
        for match in ("-d", "-s"):
            self.run("iptables", flag, "INPUT", match, f"{address}/32", "-j", "DROP")

    def blackhole(self, address: str) -> None:
        """Drop (not refuse) every packet to and from ``address``: a node that vanished from the network."""
        self._rules("-I", address)

    def restore(self, address: str) -> None:
        self._rules("-D", address)

    def delete(self) -> None:
        """Kill what still runs inside, remove the namespace and its /etc/netns files."""
        if self.created:
            pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
            for pid in pids.stdout.split():
                kill_tree(int(pid))
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.created = False
        shutil.rmtree(self.etc, ignore_errors=True)
        if self._made_etc_netns:
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # only if empty (another user's namespaces keep it)


class Node(SshServer):
    """One sshd on one loopback address and a given port, its own target directory.

    Args:
        base: a directory of its own.
        address: ``node_address(i)``.
        port: the same for every node of a fleet (``pick_port``).
        netns: run sshd inside this namespace (default: the machine's).
        rrsync: the account is jailed with ``rrsync -wo`` (True) or a plain /bin/sh account.
    """

    def __init__(
        self,
        base: Path,
        client: KeyPair,
        host_key: KeyPair,
        address: str,
        port: int,
        rrsync: bool = True,
        netns: NetNs | None = None,
    ) -> None:
        self.address = address  # before the base class writes known_hosts through known_hosts_line()
        super().__init__(base, client, host_key, rrsync=rrsync)
        self.port = port
        self.netns = netns
        self.pid_file = base / "sshd.pid"
        self.log = base / "sshd.log"
        lines = []
        for line in self.config.read_text().splitlines():
            if line.startswith("Port "):
                line = f"Port {port}"
            elif line.startswith("ListenAddress "):
                line = f"ListenAddress {address}"
            lines.append(line)
        self.config.write_text("\n".join(lines) + "\n")
        self.known_hosts.write_text(self.known_hosts_line() + "\n")

    def known_hosts_line(self, name: str | None = None) -> str:
        kind, key = self.host_key.public_text.split()[:2]
        return f"{name or f'[{self.address}]:{self.port}'} {kind} {key}"

    @property
    def url(self) -> str:
        path = "/" if self.rrsync else f"{self.root}/"
        return f"ssh://{self.user}@{self.address}:{self.port}{path}"

    def launch(self) -> None:
        """Start sshd without waiting (see :meth:`wait_listening`), so a fleet starts in parallel."""
        Path("/run/sshd").mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        prefix = self.netns.prefix if self.netns else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(self.config)], stderr=log)

    def listening(self) -> bool:
        """sshd writes its PidFile only once its listen sockets are bound (sshd.c: "Write out the pid
        file after the sigterm handler is setup and the listen sockets are bound")."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sshd on {self.address}:{self.port} exited: {self.log.read_text(errors='replace')}")
        return self.pid_file.exists() and self.pid_file.stat().st_size > 0

    def wait_listening(self, timeout: float = 20) -> None:
        wait_until(self.listening, timeout, f"sshd on {self.address}:{self.port}")

    def start(self) -> Node:
        self.launch()
        self.wait_listening()
        return self

    def pause(self) -> None:
        """SIGSTOP the server and its sessions: connections stay open, nothing answers."""
        if self.proc is not None:
            kill_tree(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, signal.SIGCONT)

    def session_pids(self) -> list[int]:
        """sshd processes below the listener: one (plus privilege separation) per open connection."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], list(children.get(self.proc.pid, []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found


def start_nodes(
    base: Path,
    client: KeyPair,
    host_key: KeyPair,
    count: int,
    rrsync: bool = True,
    netns: NetNs | None = None,
    port: int | None = None,
) -> list[Node]:
    """``count`` nodes at 127.0.0.2.. on one port, started in parallel; stopped again if one fails."""
    addresses = [node_address(i) for i in range(count)]
    # Inside a fresh namespace every port is free; outside, check each address.
    port = port or (free_port() if netns else pick_port(addresses))
    nodes = [Node(base / f"node-{i:02d}", client, host_key, a, port, rrsync, netns) for i, a in enumerate(addresses)]
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_listening()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


class NsSidecar(PrefixedSidecar):
    """The daemon inside a :class:`NetNs`; its HTTP endpoints are read from inside the namespace too."""

    _GET = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=5); code, body = r.status, r.read()\n"
        "except urllib.error.HTTPError as e:\n"
        "    code, body = e.code, e.read()\n"
        "except OSError:\n"
        "    code, body = 0, b''\n"
        "sys.stdout.write(str(code) + '\\n' + body.decode())\n"
    )

    def __init__(self, netns: NetNs, *args: object, **env: str) -> None:
        super().__init__(netns.prefix, *args, **env)

    def get(self, path: str) -> tuple[int, str]:
        out = subprocess.run(
            [*self.prefix, sys.executable, "-I", "-S", "-c", self._GET, f"http://127.0.0.1:{self.port}{path}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        head, _, body = out.stdout.partition("\n")
        return (int(head), body) if head.isdigit() else (0, "")

    def readyz(self) -> tuple[int, dict]:
        code, body = self.get("/readyz")
        try:
            return code, (json.loads(body) if body else {})
        except ValueError:
            return code, {}
