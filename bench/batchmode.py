"""Experiment (issue 12): rsync's batch mode for a burst to many identical targets, and the rrsync jail.

``.venv/bin/python -m bench.batchmode [--quick] [--targets N] [--files F]`` (as root, repository root).

The idea: the sender's work for a burst (reading, checksumming and sending every file) is done once per
target today. ``rsync --write-batch=FILE`` records one transfer; ``rsync --read-batch=FILE`` replays it
into a directory that is in the same state the recorded one was in. Compared, on N nodes (one sshd per
127.0.0.x, plain shell accounts, one ssh master each, as in W6), for one burst of new files:

* A, per target: N rsyncs of the burst's file list at once (what the sidecar and the floor do);
* B, record + replay: one real transfer to node 0 with ``--write-batch``, then the batch replayed on
  the other N-1 at once: ``ssh NODE rsync --read-batch=- -R OPTIONS DIR/ < FILE`` (the replay runs on
  the node and reads the batch from stdin; ``-R`` by hand: see ``REPLAY_NEEDS_R``);
* C, record locally + replay everywhere: ``--only-write-batch`` against an empty local directory (no
  transfer), then N replays at once.

And through an ``rrsync -wo`` account (what a production target is), each way a replay could be sent.
Results: a table on stdout and ``bench/results/batchmode[-quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.proc import cpu_seconds, descendants
from tests.helpers import tree
from tests.nodes import Node, start_nodes
from tests.sshd import KeyPair, kill_tree, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
# The sidecar's batch options (sidecar/rsync.py), whole files as it sends them.
OPTS = ["--links", "--safe-links", "--times", "--omit-dir-times", "--perms", "--chmod=D755,F644", "--whole-file"]
# The .sh file rsync writes next to a batch drops --files-from, and with it the -R (--relative) that
# --files-from implies: replayed without -R, the implied parent directories are not made and every
# file fails ("mkstemp ... No such file or directory", exit 23). Found here; hence -R on every replay.
REPLAY_NEEDS_R = ["-R"]


def _ssh(key: KeyPair, node: Node, known: Path, control: Path, **opts: str) -> list[str]:
    base = {
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(known),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "BatchMode": "yes",
        "Compression": "no",
        "LogLevel": "ERROR",
        "ControlPath": str(control),
        "ControlMaster": "no",
    } | opts
    args = ["ssh", "-i", str(key.private), "-p", str(node.port)]
    for k, v in base.items():
        args += ["-o", f"{k}={v}"]
    return args


class Meter:
    """Wall time, sending-side CPU (this process' reaped children + the masters) and the nodes' CPU."""

    def __init__(self, masters: list[int], nodes: list[Node]) -> None:
        self.masters, self.nodes = masters, nodes

    def _now(self) -> tuple[float, float, float]:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        sender = ru.ru_utime + ru.ru_stime + cpu_seconds(descendants(self.masters))
        receiver = cpu_seconds(descendants([n.proc.pid for n in self.nodes if n.proc is not None]))
        return time.perf_counter(), sender, receiver

    def __enter__(self) -> Meter:
        self.t0 = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = self._now()
        self.wall, self.sender, self.receiver = (round(b - a, 3) for a, b in zip(self.t0, t1, strict=True))

    def result(self, rcs: list[tuple[int, str]], ok: bool) -> dict[str, Any]:
        return {
            "wall_s": self.wall,
            "sender_cpu_s": self.sender,
            "receiver_cpu_s": self.receiver,
            "exit": sorted({rc for rc, _ in rcs}),
            "errors": sorted({err for rc, err in rcs if rc})[:3],
            "ok": ok,
        }


def _run_all(cmds: list[list[str]], stdin: bytes | list[Path] | None) -> list[tuple[int, str]]:
    """Start every command at once; ``stdin`` bytes for all, or a file per command; returns (rc, stderr)."""
    procs = []
    for i, cmd in enumerate(cmds):
        if isinstance(stdin, list):
            with open(stdin[i], "rb") as fh:
                procs.append(subprocess.Popen(cmd, stdin=fh, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        else:
            p = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if stdin is not None:
                assert p.stdin is not None
                p.stdin.write(stdin)
                p.stdin.close()
            procs.append(p)
    out = []
    for p in procs:
        err = p.stderr.read().decode(errors="replace") if p.stderr is not None else ""
        out.append((p.wait(), err.strip()[:300]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batchmode", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 targets, 1,000 files")
    ap.add_argument("--targets", type=int, help="N (default 16; quick 4)")
    ap.add_argument("--files", type=int, help="burst size (default 10,000; quick 1,000)")
    ap.add_argument("--size", type=int, default=4096, help="bytes per file (default 4096)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the experiment creates the ssh target account and starts sshds", file=sys.stderr)
        return 2
    n = args.targets or (4 if args.quick else 16)
    files = args.files or (1000 if args.quick else 10_000)
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="upsync-batch-", dir=shm if shm.is_dir() else None))
    base.chmod(0o755)
    nodes: list[Node] = []
    jail: Node | None = None
    masters: list[subprocess.Popen[bytes]] = []
    try:
        key, host = KeyPair(base, "client"), KeyPair(base, "host")
        nodes = start_nodes(base / "nodes", key, host, n + 1, rrsync=False)
        last = nodes.pop()  # its address again, jailed: an rrsync -wo account like a production target
        last.stop()
        jail = Node(base / "jail", key, host, last.address, last.port, rrsync=True).start()
        known = base / "known_hosts"
        known.write_text("".join(x.known_hosts_line() + "\n" for x in [*nodes, jail]))
        ctl = base / "ctl"
        ctl.mkdir(mode=0o700)
        sockets = [ctl / f"{i}.sock" for i in range(n + 1)]
        for node, sock in zip([*nodes, jail], sockets, strict=True):
            cmd = [*_ssh(key, node, known, sock, ControlMaster="yes", ControlPersist="no"), "-N"]
            masters.append(subprocess.Popen([*cmd, f"{node.user}@{node.address}"], stdin=subprocess.DEVNULL))
        for sock in sockets:
            wait_until(sock.exists, 30, f"master {sock.name}")
        rsh = [" ".join(_ssh(key, node, known, sock)) for node, sock in zip(nodes, sockets[:n], strict=True)]

        src = base / "src"
        dirs = 50 if files >= 1000 else 5
        pool = os.urandom(args.size + 4096)
        rels = [f"burst/b{i % dirs:02d}/f{i:05d}.bin" for i in range(files)]
        for d in range(dirs):
            (src / f"burst/b{d:02d}").mkdir(parents=True)
        for i, rel in enumerate(rels):
            (src / rel).write_bytes(f"{i:08d}".encode() + pool[i % 4096 : i % 4096 + args.size - 8])
        listing = b"".join(r.encode() + b"\0" for r in rels)
        want = tree(src / "burst")

        def target(method: str, i: int) -> Path:
            path = nodes[i].root / method
            path.mkdir(exist_ok=True)
            shutil.chown(path, nodes[i].user, nodes[i].user)
            return path

        def dest(method: str, i: int) -> str:
            return f"{nodes[i].user}@{nodes[i].address}:{target(method, i)}/"

        def verify(method: str) -> bool:
            return all(tree(nodes[i].root / method / "burst") == want for i in range(n))

        pids = [m.pid for m in masters]
        res: dict[str, Any] = {"targets": n, "files": files, "file_size": args.size, "options": OPTS}
        print(f"{n} targets, {files:,} files of {args.size} bytes", file=sys.stderr)

        # A: per target, N rsyncs at once.
        cmds = [["rsync", "-e", rsh[i], *OPTS, "--from0", "--files-from=-", f"{src}/", dest("a", i)] for i in range(n)]
        with Meter(pids, nodes) as a:
            rcs = _run_all(cmds, listing)
        res["a_per_target"] = a.result(rcs, verify("a"))

        # B: record while sending to node 0, replay on the other N-1.
        batch = base / "b.batch"
        write = ["rsync", "-e", rsh[0], f"--write-batch={batch}", *OPTS, "--from0", "--files-from=-", f"{src}/"]
        replay = [[*_ssh(key, nodes[i], known, sockets[i]), f"{nodes[i].user}@{nodes[i].address}",
                   " ".join(["rsync", "--read-batch=-", *REPLAY_NEEDS_R, *OPTS, f"{target('b', i)}/"])]
                  for i in range(1, n)]  # fmt: skip
        with Meter(pids, nodes) as b:
            first = _run_all([[*write, dest("b", 0)]], listing)
            rcs = _run_all(replay, [batch] * len(replay))
        res["b_record_and_replay"] = b.result(first + rcs, verify("b"))
        res["b_record_and_replay"]["batch_bytes"] = batch.stat().st_size
        res["b_record_and_replay"]["script"] = (base / "b.batch.sh").read_text().strip()

        # C: record locally against an empty directory (no transfer), replay on all N.
        empty = base / "empty"
        empty.mkdir()
        batch_c = base / "c.batch"
        only = ["rsync", f"--only-write-batch={batch_c}", *OPTS, "--from0", "--files-from=-", f"{src}/", f"{empty}/"]
        replay = [[*_ssh(key, nodes[i], known, sockets[i]), f"{nodes[i].user}@{nodes[i].address}",
                   " ".join(["rsync", "--read-batch=-", *REPLAY_NEEDS_R, *OPTS, f"{target('c', i)}/"])]
                  for i in range(n)]  # fmt: skip
        with Meter(pids, nodes) as c:
            first = _run_all([only], listing)
            rcs = _run_all(replay, [batch_c] * n)
        res["c_record_once_replay_all"] = c.result(first + rcs, verify("c"))

        # Without -R the replay fails (why REPLAY_NEEDS_R exists).
        no_r = [*_ssh(key, nodes[0], known, sockets[0]), f"{nodes[0].user}@{nodes[0].address}",
                " ".join(["rsync", "--read-batch=-", *OPTS, f"{target('no-r', 0)}/"])]  # fmt: skip
        res["replay_without_R"] = _run_all([no_r], [batch_c])[0]

        # Through rrsync -wo: every way a replay could be sent to the jailed account.
        jrsh = " ".join(_ssh(key, jail, known, sockets[-1]))
        jail_login = f"{jail.user}@{jail.address}"
        jssh = [*_ssh(key, jail, known, sockets[-1]), jail_login]
        attempts = {
            "rsync --read-batch=FILE ... host:/dir/ (replay sent by the client)": (
                ["rsync", "-e", jrsh, f"--read-batch={batch_c}", *REPLAY_NEEDS_R, *OPTS, f"{jail_login}:/x/"],
                None,
            ),
            "ssh host rsync --read-batch=- -R ... dir/ < FILE (replay run on the target)": (
                [*jssh, " ".join(["rsync", "--read-batch=-", *REPLAY_NEEDS_R, *OPTS, "x/"])],
                [batch_c],
            ),
            "ssh host rsync --server --read-batch=- ... . dir/ < FILE (dressed as a server command)": (
                [*jssh, "rsync --server --read-batch=- -logDtpre.iLsfxCIvu . x/"],
                [batch_c],
            ),
            "rsync --write-batch=FILE ... host:/dir/ (recording while sending to the jail)": (
                ["rsync", "-e", jrsh, f"--write-batch={base / 'j.batch'}", *OPTS, "-r", f"{src}/burst/b00",
                 f"{jail_login}:/w/"],
                None,
            ),
        }  # fmt: skip
        res["rrsync"] = {}
        for what, (cmd, stdin) in attempts.items():
            rc, err = _run_all([cmd], stdin)[0]
            res["rrsync"][what] = {"exit": rc, "stderr": err}

        print(_table(res))
        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / ("batchmode-quick.json" if args.quick else "batchmode.json")
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)
        return 0
    finally:
        for m in masters:
            kill_tree(m.pid)
            m.wait()
        for node in nodes:
            node.stop()
        if jail is not None:
            jail.stop()
        shutil.rmtree(base, ignore_errors=True)


def _table(res: dict[str, Any]) -> str:
    n, files = res["targets"], res["files"]
    lines = [
        f"| {n} targets, {files:,} new files | wall s | sending CPU s | receiving CPU s | exit codes | trees |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("a_per_target", "A: N rsyncs at once (today)"),
        ("b_record_and_replay", "B: --write-batch to node 0, N-1 replays"),
        ("c_record_once_replay_all", "C: --only-write-batch locally, N replays"),
    ):
        x = res[key]
        trees = "equal" if x["ok"] else "DIFFER"
        lines.append(
            f"| {label} | {x['wall_s']} | {x['sender_cpu_s']} | {x['receiver_cpu_s']} | {x['exit']} | {trees} |"
        )
    lines += ["", "| through `rrsync -wo` | exit | message |", "|---|---|---|"]
    for what, x in res["rrsync"].items():
        lines.append(f"| {what} | {x['exit']} | {x['stderr'].splitlines()[0] if x['stderr'] else ''} |")
    rc, err = res["replay_without_R"]
    lines += ["", f"replay without -R (plain account): exit {rc}: {err.splitlines()[0] if err else ''}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
