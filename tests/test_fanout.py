"""Fan-out at scale (issue 12): many web nodes, one of them dead, one leaving DNS.

Every node is its own host: its own loopback address (127.0.0.2, .3, ...), its own sshd (same port
for all, as in a real fleet) and its own rrsync-jailed target directory (``tests/nodes.py``). The
daemon and the nodes run in a network namespace the test creates, so a firewall rule there can drop
one node's packets (a blackhole: nothing is refused, everything times out) and ``/etc/hosts`` is the
test's own (``dns+ssh://`` names).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.faultlib import converge_all, ssh_masters, wait_synced
from tests.helpers import assert_converges, tree_diff, wait_until
from tests.nodes import NetNs, Node, NsSidecar, start_nodes
from tests.sshd import KeyPair

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, ssh target account)"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("iptables")), reason="needs iproute2 and iptables"),
]

FILE_SIZE = 64 * 1024
SAMPLES = 4  # files per phase
_names = itertools.count()


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs(f"upsync-fan-{os.getpid()}-{next(_names)}").create()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def fleet(netns: NetNs, workdir: Path, client_key: KeyPair, host_key: KeyPair) -> Iterator[list[Node]]:
    """16 nodes (127.0.0.2 .. 127.0.0.17) inside ``netns``; stopped afterwards."""
    nodes = start_nodes(workdir / "nodes", client_key, host_key, 16, netns=netns)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def start_daemon(netns: NetNs, source: Path, targets: list[Node] | str, client_key: KeyPair, workdir: Path,
                 sidecars: list, **env: str) -> NsSidecar:  # fmt: skip
    runtime = workdir / "runtime"
    runtime.mkdir(exist_ok=True)
    env.setdefault("SYNC_RUNTIME_DIR", str(runtime))
    sidecar = NsSidecar(netns, source, targets, client_key, workdir, **env)
    sidecars.append(sidecar)
    sidecar.start()
    wait_synced(sidecar, timeout=90)
    return sidecar


def deliver(source: Path, nodes: list[Node], rel: str, timeout: float = 60) -> float:
    """Write one new file; seconds until it is complete on every node of ``nodes``."""
    data = os.urandom(FILE_SIZE)
    waiting = {node.address: node.root / rel for node in nodes}
    t0 = time.monotonic()
    (source / rel).write_bytes(data)

    def arrived() -> bool:
        for address, path in list(waiting.items()):
            try:
                if path.stat().st_size == len(data) and path.read_bytes() == data:
                    del waiting[address]
            except OSError:
                pass
        return not waiting

    try:
        wait_until(arrived, timeout, f"{rel} on {len(nodes)} nodes", interval=0.005)
    except TimeoutError:
        raise AssertionError(f"{rel} missing after {timeout} s on {sorted(waiting)}") from None
    return time.monotonic() - t0


def syncs_by_target(sidecar: NsSidecar) -> dict[str, float]:
    """upsync_syncs_total summed over kind and status, per target."""
    out: dict[str, float] = {}
    for line in sidecar.get("/metrics")[1].splitlines():
        if line.startswith("upsync_syncs_total{"):
            head, _, value = line.rpartition(" ")
            target = head.split('target="', 1)[1].split('"', 1)[0]
            out[target] = out.get(target, 0.0) + float(value)
    return out


def target_state(sidecar: NsSidecar, name: str) -> str:
    doc = sidecar.readyz()[1]
    return next((t["state"] for t in doc.get("targets", []) if t["target"] == name), "absent")


def test_blackholed_node_does_not_delay_the_others(
    netns: NetNs, fleet: list[Node], source: Path, client_key: KeyPair, workdir: Path, sidecars: list
) -> None:
    (source / "lat").mkdir()
    # A dead node's hung transfer lasts ~20 s (ssh's ServerAlive ends it, not rsync's --timeout: no byte
    # ever arrives) and each connect attempt 3 s here: far beyond the delay allowed below, so the
    # assertions fail if the others wait for it. The short timeouts keep the test short.
    sidecar = start_daemon(
        netns, source, fleet, client_key, workdir, sidecars, SYNC_IO_TIMEOUT_S="5", SYNC_SSH_CONNECT_TIMEOUT_S="3"
    )
    dead = fleet[5]
    alive = [n for n in fleet if n is not dead]
    dead_name = dead.url  # the target name in /readyz and /metrics
    base = [deliver(source, fleet, f"lat/base-{i}.bin") for i in range(SAMPLES)]

    netns.blackhole(dead.address)
    t_drop = time.monotonic()
    print(f"[fanout] {dead.address} blackholed at {time.strftime('%H:%M:%S')}")
    hung = [deliver(source, alive, f"lat/hung-{i}.bin") for i in range(SAMPLES)]  # its transfer hangs
    assert not (dead.root / "lat/hung-0.bin").exists(), "the blackhole let a file through"
    wait_until(lambda: target_state(sidecar, dead_name) == "failing", 45, "the dead node to be reported failing")
    noticed = time.monotonic() - t_drop

    # Its retries are its own: the healthy targets run no sync while it fails again.
    before = syncs_by_target(sidecar)
    failures = sidecar.metric("upsync_failures_total", target=dead_name)
    wait_until(lambda: sidecar.metric("upsync_failures_total", target=dead_name) >= failures + 1, 30, "one more retry")
    after = syncs_by_target(sidecar)
    assert {n.url: after.get(n.url) for n in alive} == {n.url: before.get(n.url) for n in alive}

    retrying = [deliver(source, alive, f"lat/retrying-{i}.bin") for i in range(SAMPLES)]  # it reconnects in vain

    netns.restore(dead.address)
    back = assert_converges(source, dead.root, timeout=60)
    for node in alive:
        assert not tree_diff(source, node.root), node.address

    # "About one batch": the median may grow by one batch round (the median without a dead node),
    # plus scheduling noise; the slowest sample by one more round and a second.
    one_batch = statistics.median(base)
    print(
        f"[fanout] 16 nodes, 1 blackholed: to all, no dead node {[round(x, 3) for x in base]} s; "
        f"to the 15 others while its transfer hangs {[round(x, 3) for x in hung]} s, while it retries "
        f"{[round(x, 3) for x in retrying]} s; reported failing {noticed:.1f} s after the drop; converged "
        f"{back:.1f} s after the node came back"
    )
    for phase, values in (("hung transfer", hung), ("retrying", retrying)):
        assert statistics.median(values) <= statistics.median(base) + one_batch + 0.3, (phase, base, values)
        assert max(values) <= max(base) + one_batch + 1.0, (phase, base, values)


def test_every_target_receives_the_same_files(
    netns: NetNs, fleet: list[Node], source: Path, client_key: KeyPair, workdir: Path, sidecars: list
) -> None:
    """A burst to 16 targets: every one ends byte-identical to the source and got the same list of files.

    The files are written in place (open, write, close), so some are seen twice and sent again; with one
    plan handed to every target, every target gets the same sends (the same count), whatever it is, unless a
    target fell behind and planned merged batches on its own (counted as a private plan).
    """
    sidecar = start_daemon(netns, source, fleet, client_key, workdir, sidecars)
    sent0 = {n.url: sidecar.metric("upsync_files_sent_total", target=n.url) for n in fleet}
    files = 400
    for d in range(8):
        (source / f"burst-{d}").mkdir()
    for i in range(files):
        (source / f"burst-{i % 8}/f{i:04d}.bin").write_bytes(os.urandom(2048))
    converge_all({n.address: (source, n.root) for n in fleet}, timeout=120)
    sent = {n.url: sidecar.metric("upsync_files_sent_total", target=n.url) - sent0[n.url] for n in fleet}
    shared = sidecar.metric("upsync_plans_total", kind="shared")
    private = sidecar.metric("upsync_plans_total", kind="private")
    print(f"[fanout] {files} files written, files sent per target: {sorted(sent.values())}; plans {shared=} {private=}")
    assert min(sent.values()) >= files, sent
    assert shared >= 1
    # By design (sidecar.plan.SharedPlans) a target that fell behind and holds more than one batch merges them
    # and plans on its own, so its count may differ (it saved re-sends); that happened once in a loaded full
    # suite. Without a private plan, every target got exactly the same sends.
    if private == 0:
        assert len(set(sent.values())) == 1, sent


def test_node_removed_from_dns_stops_costing(
    netns: NetNs, workdir: Path, source: Path, client_key: KeyPair, host_key: KeyPair, sidecars: list
) -> None:
    interval = 2
    nodes = start_nodes(workdir / "nodes", client_key, host_key, 4, netns=netns)
    try:
        netns.write_hosts({"web": [n.address for n in nodes]})
        known = workdir / "web_known_hosts"
        known.write_text(nodes[0].known_hosts_line("web") + "\n")  # a HostKeyAlias is looked up without the port
        spec = f"dns+ssh://{nodes[0].user}@web:{nodes[0].port}/"
        sidecar = start_daemon(
            netns, source, spec, client_key, workdir, sidecars,
            SYNC_SSH_KNOWN_HOSTS_FILE=str(known), SYNC_RESOLVE_INTERVAL_S=str(interval),
        )  # fmt: skip
        assert sidecar.proc is not None
        names = {n.address: f"ssh://{n.user}@{n.address}:{n.port}/" for n in nodes}
        assert sorted(t["target"] for t in sidecar.readyz()[1]["targets"]) == sorted(names.values())
        deliver(source, nodes, "before.bin")
        gone = nodes[3]

        def master_of(node: Node) -> list[int]:
            return [p for p in ssh_masters(sidecar.proc.pid) if node.address in _cmdline(p)]

        assert master_of(gone), "no ssh master for the node before it left"
        netns.write_hosts({"web": [n.address for n in nodes[:3]]})
        t0 = time.monotonic()
        seen: dict[str, float] = {}

        def gone_everywhere() -> bool:
            checks = {
                "ssh master exited": lambda: not master_of(gone),
                "sessions on the node closed": lambda: not gone.session_pids(),
                "not in /readyz": lambda: target_state(sidecar, names[gone.address]) == "absent",
                "no per-target gauge in /metrics": lambda: (
                    f'upsync_pending_paths{{target="{names[gone.address]}"}}' not in sidecar.get("/metrics")[1]
                ),
            }
            for what, check in checks.items():
                if what not in seen and check():
                    seen[what] = round(time.monotonic() - t0, 2)
            return len(seen) == len(checks)

        wait_until(gone_everywhere, interval + 15, f"the removed node to be dropped (so far {seen})", interval=0.1)
        print(f"[fanout] node removed from DNS (SYNC_RESOLVE_INTERVAL_S={interval}), seconds until: {seen}")
        assert max(seen.values()) <= interval + 3, seen  # one interval, plus stopping the worker and its master

        deliver(source, nodes[:3], "after.bin")
        assert not (gone.root / "after.bin").exists()
        stale = [
            line.split(" ")[0]
            for line in sidecar.get("/metrics")[1].splitlines()
            if f'target="{names[gone.address]}"' in line
        ]
        assert not stale, f"series of the removed target remain in /metrics: {stale}"
    finally:
        for node in nodes:
            node.stop()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
