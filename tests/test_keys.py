"""``python -m sidecar keys``: the pure decisions (table tests), then real runs (ssh-keygen, modes, owners,
idempotence) and the keys used for real against an sshd with the rrsync-jailed account."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.keys import (
    KeysError,
    Owner,
    Topology,
    authorized_keys_line,
    fingerprint,
    known_hosts_line,
    known_hosts_names,
    kubernetes_commands,
    parse_owner,
    public_key,
    swarm_commands,
    topology_files,
    topology_keys,
)
from tests.helpers import REPO, Sidecar, assert_converges
from tests.sshd import KeyPair, SshServer

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def keys(*args: str, cwd: Path | None = None, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path if path is not None else os.environ["PATH"], "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ----- pure ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("33", Owner(33, 33)), ("33:0", Owner(33, 0)), ("0", Owner(0, 0)), ("10001:10001", Owner(10001, 10001))],
)
def test_parse_owner(text: str, expected: Owner) -> None:
    assert parse_owner(text, "--owner") == expected


@pytest.mark.parametrize("text", ["", "www-data", "33:", ":33", "-1", "33:x", "1:2:3", "99999999999"])
def test_parse_owner_refuses(text: str) -> None:
    with pytest.raises(KeysError, match=r'^invalid --owner=".*": must be a numeric UID or UID:GID'):
        parse_owner(text, "--owner")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PUB, PUB),
        (PUB + " comment with words\n", PUB),
        ('command="/usr/bin/rrsync -wo /x",restrict ' + PUB + " c", PUB),
        ("content " + PUB, PUB),  # a known_hosts line
        ("ecdsa-sha2-nistp256 AAAA", "ecdsa-sha2-nistp256 AAAA"),
    ],
)
def test_public_key(text: str, expected: str) -> None:
    assert public_key(text, "x") == expected


@pytest.mark.parametrize(
    "text", ["", "-----BEGIN OPENSSH PRIVATE KEY-----", "ssh-ed25519", "ssh-ed25519 not*base64", "AAAA"]
)
def test_public_key_refuses(text: str) -> None:
    with pytest.raises(KeysError, match=r"^invalid the key: must be an ssh public key"):
        public_key(text, "the key")


def test_fingerprint_is_ssh_keygens(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text(PUB + " c\n")
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True).stdout
    assert shown.split()[1] == fingerprint(PUB)


@pytest.mark.parametrize(
    ("targets", "names"),
    [
        ("ssh://upsync@content/", ("content",)),
        ("ssh://upsync@content:22/srv", ("content",)),
        ("ssh://upsync@content.example.net:2222/", ("[content.example.net]:2222",)),
        ("upsync@10.0.0.5:/srv/uploads", ("10.0.0.5",)),
        ("ssh://upsync@[2001:db8::1]:2200/", ("[2001:db8::1]:2200",)),
        # dns+ssh: every address is checked as the name (HostKeyAlias), which ssh looks up without a port
        ("dns+ssh://upsync@web/", ("web",)),
        ("dns+ssh://upsync@web:2222/", ("web",)),
        ("dns+ssh://upsync@web/, dns+ssh://upsync@tasks.web/", ("web", "tasks.web")),
        ("ssh://a@content/, ssh://b@content/x", ("content",)),  # one name once
    ],
)
def test_known_hosts_names(targets: str, names: tuple[str, ...]) -> None:
    assert known_hosts_names(targets, "--targets") == names


@pytest.mark.parametrize("targets", ["", "content", "ssh://content/", "http://u@h/", "ssh://u@h:99999/"])
def test_known_hosts_names_refuses(targets: str) -> None:
    with pytest.raises(KeysError, match=rf'^invalid --targets="{targets}": must'):
        known_hosts_names(targets, "--targets")


@pytest.mark.parametrize(
    ("names", "line"),
    [
        (("content",), f"content {PUB}\n"),
        (("[content.example.net]:2222",), f"[content.example.net]:2222 {PUB}\n"),
        (("web", "tasks.web"), f"web,tasks.web {PUB}\n"),
    ],
)
def test_known_hosts_line(names: tuple[str, ...], line: str) -> None:
    assert known_hosts_line(names, PUB) == line


@pytest.mark.parametrize(
    ("rrsync_dir", "line"),
    [
        ("/srv/uploads", f'command="/usr/bin/rrsync -wo /srv/uploads",restrict {PUB} upsync-sidecar\n'),
        ("/var/www/html/wp-content/uploads", f'command="/usr/bin/rrsync -wo /var/www/html/wp-content/uploads",restrict {PUB} upsync-sidecar\n'),  # noqa: E501
    ],
)  # fmt: skip
def test_authorized_keys_line(rrsync_dir: str, line: str) -> None:
    assert authorized_keys_line(PUB, rrsync_dir, "upsync-sidecar") == line


def test_topology_files_give_each_consumer_its_own() -> None:
    topo = Topology(
        sidecar_owner=Owner(33, 33),
        fanout_owner=Owner(10001, 10001),
        node_owner=Owner(0, 0),
        content_names=("[content]:2222",),
        web_names=("web",),
        rrsync_dir="/data",
    )
    pubs = {spec.rel: f"ssh-ed25519 {spec.rel.split('/')[0].upper()}" for spec in topology_keys(topo)}
    files = {f.rel: f for f in topology_files(topo, pubs)}
    # (path, mode, owner, text): every file of the layout, nothing else
    expected = {
        "sidecar": (0o700, Owner(33, 33), None),
        "sidecar/id_ed25519": (0o600, Owner(33, 33), None),
        "sidecar/id_ed25519.pub": (0o644, Owner(33, 33), None),
        "sidecar/known_hosts": (0o644, Owner(33, 33), "[content]:2222 ssh-ed25519 CONTENT\n"),
        "fanout": (0o700, Owner(10001, 10001), None),
        "fanout/id_ed25519": (0o600, Owner(10001, 10001), None),
        "fanout/id_ed25519.pub": (0o644, Owner(10001, 10001), None),
        "fanout/known_hosts": (0o644, Owner(10001, 10001), "web ssh-ed25519 WEB\n"),
        "content": (0o755, Owner(0, 0), None),
        "content/ssh_host_ed25519_key": (0o600, Owner(0, 0), None),
        "content/ssh_host_ed25519_key.pub": (0o644, Owner(0, 0), None),
        "content/authorized_keys": (
            0o644,
            Owner(0, 0),
            'command="/usr/bin/rrsync -wo /data",restrict ssh-ed25519 SIDECAR upsync-sidecar\n',
        ),
        "web": (0o755, Owner(0, 0), None),
        "web/ssh_host_ed25519_key": (0o600, Owner(0, 0), None),
        "web/ssh_host_ed25519_key.pub": (0o644, Owner(0, 0), None),
        "web/authorized_keys": (
            0o644,
            Owner(0, 0),
            'command="/usr/bin/rrsync -wo /data",restrict ssh-ed25519 FANOUT upsync-fanout\n',
        ),
    }
    assert {rel: (f.mode, f.owner, f.text) for rel, f in files.items()} == expected


def test_secret_commands_name_every_file_once() -> None:
    swarm = swarm_commands("my keys", "site1")
    assert len(swarm) == 8 and all(c.startswith("docker secret inspect site1-") for c in swarm)
    assert "docker secret create site1-content-host-key 'my keys/content/ssh_host_ed25519_key'" in swarm[4]
    k8s = kubernetes_commands("k", "site1", "prod")
    assert [c.split()[6] for c in k8s] == [
        "site1-sidecar-ssh",
        "site1-fanout-ssh",
        "site1-content-ssh",
        "site1-web-ssh",
    ]
    assert all(c.startswith("kubectl -n prod create secret generic ") for c in k8s)


# ----- real runs ------------------------------------------------------------------------------------------


def _layout(root: Path) -> dict[str, tuple[str, int, int]]:
    return {
        str(p.relative_to(root)): (oct(p.stat().st_mode & 0o777), p.stat().st_uid, p.stat().st_gid)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other uids (needs root)")
def test_topology_is_made_once_and_kept(tmp_path: Path) -> None:
    owners = ["--sidecar-owner", "33:33", "--fanout-owner", "10001", "--node-owner", "0:0"]
    first = keys("keys", *owners, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    root = tmp_path / "keys"
    assert _layout(root) == {
        "content": ("0o755", 0, 0),
        "content/authorized_keys": ("0o644", 0, 0),
        "content/ssh_host_ed25519_key": ("0o600", 0, 0),
        "content/ssh_host_ed25519_key.pub": ("0o644", 0, 0),
        "fanout": ("0o700", 10001, 10001),
        "fanout/id_ed25519": ("0o600", 10001, 10001),
        "fanout/id_ed25519.pub": ("0o644", 10001, 10001),
        "fanout/known_hosts": ("0o644", 10001, 10001),
        "sidecar": ("0o700", 33, 33),
        "sidecar/id_ed25519": ("0o600", 33, 33),
        "sidecar/id_ed25519.pub": ("0o644", 33, 33),
        "sidecar/known_hosts": ("0o644", 33, 33),
        "web": ("0o755", 0, 0),
        "web/authorized_keys": ("0o644", 0, 0),
        "web/ssh_host_ed25519_key": ("0o600", 0, 0),
        "web/ssh_host_ed25519_key.pub": ("0o644", 0, 0),
    }
    assert first.stderr.count("upsync keys: made ") == 4
    sidecar_pub = (root / "sidecar/id_ed25519.pub").read_text()
    assert (root / "content/authorized_keys").read_text() == (
        'command="/usr/bin/rrsync -wo /srv/uploads",restrict ' + public_key(sidecar_pub, "") + " upsync-sidecar\n"
    )
    web_pub = public_key((root / "web/ssh_host_ed25519_key.pub").read_text(), "")
    assert (root / "fanout/known_hosts").read_text() == f"web,tasks.web {web_pub}\n"
    # The printed load commands: 8 Swarm secrets, 4 Kubernetes Secrets, paths as DIR was given.
    out = first.stdout.splitlines()
    assert sum(line.startswith("docker secret inspect upsync-") for line in out) == 8
    assert sum(line.startswith("kubectl -n upsync create secret generic upsync-") for line in out) == 4
    assert "docker secret create upsync-sidecar-key keys/sidecar/id_ed25519" in first.stdout

    before = {p: (root / p).read_bytes() for p in _layout(root) if (root / p).is_file()}
    # A mode changed by hand, a .pub lost, and a different uid for the sidecar: the second run keeps
    # every key, remakes the .pub from its key, and applies modes and owners again.
    (root / "content/ssh_host_ed25519_key").chmod(0o644)
    (root / "fanout/id_ed25519.pub").unlink()
    second = keys("keys", *owners[:1], "4242:4242", *owners[2:], "--quiet", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "" and second.stderr.count("upsync keys: kept ") == 4
    after = {p: (root / p).read_bytes() for p in _layout(root) if (root / p).is_file()}
    assert after.keys() == before.keys()
    for rel in after:
        if rel == "fanout/id_ed25519.pub":
            assert public_key(after[rel].decode(), "") == public_key(before[rel].decode(), "")
        else:
            assert after[rel] == before[rel], rel
    layout = _layout(root)
    assert layout["content/ssh_host_ed25519_key"] == ("0o600", 0, 0)
    assert layout["sidecar/id_ed25519"] == ("0o600", 4242, 4242)


def test_without_owner_flags_nothing_is_given_away(tmp_path: Path) -> None:
    proc = keys(str(tmp_path / "k"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert {(uid, gid) for _, uid, gid in _layout(tmp_path / "k").values()} == {(os.getuid(), os.getgid())}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "upsync: invalid command line: the following arguments are required: DIR"),
        (("d", "--sidecar-owner", "www-data"), 2, 'upsync: invalid --sidecar-owner="www-data": must be a numeric UID'),
        (("d", "--content-targets", "content"), 2, 'upsync: invalid --content-targets="content": must be ssh://'),
        (("d", "--rrsync-dir", "uploads"), 2, 'upsync: invalid --rrsync-dir="uploads": must be an absolute path'),
        (("d", "--rrsync-dir", "/srv/up loads"), 2, 'upsync: invalid --rrsync-dir="/srv/up loads": must be'),
        (("d", "--name", "Up_Sync"), 2, 'upsync: invalid --name="Up_Sync": must be lowercase letters'),
        (("d", "--owner", "33"), 2, "upsync: invalid --owner: must be given with --targets"),
        (("d", "--host-key", PUB), 2, "upsync: invalid --host-key: must be given with --targets"),
        (("d", "--targets", "ssh://u@h/", "--node-owner", "0"), 2, "upsync: invalid --node-owner: must not be given"),
        (("d", "--targets", "ssh://u@h/", "--host-key", "/nonexistent"), 2, 'upsync: invalid --host-key="/nonexistent"'),  # noqa: E501
        (("d", "--targets", "ssh://u@h/", "--host-key", "/etc/hostname"), 2, 'upsync: invalid --host-key="/etc/hostname" (its content): must be an ssh public key'),  # noqa: E501
        (("d", "--frobnicate"), 2, "upsync: invalid command line: unrecognized arguments: --frobnicate"),
        (("/proc/upsync-keys",), 1, "upsync: cannot make the directory /proc/upsync-keys: "),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...], code: int, message: str) -> None:
    proc = keys(*args, cwd=tmp_path)
    assert (proc.returncode, proc.stderr[: len(message)]) == (code, message), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs (needs root)")
def test_a_read_only_directory_is_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        proc = keys(str(ro), "--targets", "ssh://u@h/")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert (proc.returncode, proc.stderr) == (1, f"upsync: cannot write {ro}/id_ed25519: Read-only file system\n")


def test_a_broken_key_is_named_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "k/sidecar").mkdir(parents=True)
    (tmp_path / "k/sidecar/id_ed25519").write_text("not a key\n")
    proc = keys("k", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "upsync: invalid k/sidecar/id_ed25519: must be a private key without a passphrase"
    ), proc.stderr
    assert proc.stderr.count("\n") == 1 and "delete it to have a new one made" in proc.stderr
    assert (tmp_path / "k/sidecar/id_ed25519").read_text() == "not a key\n"


def test_without_ssh_keygen_exit_3(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    proc = keys("k", cwd=tmp_path, path=str(bin_dir))
    assert (proc.returncode, proc.stderr) == (
        3,
        "upsync: ssh-keygen is not installed or not on PATH (install the openssh-client package)\n",
    )


def test_keys_comes_first(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "--quiet-ms", "5", "keys"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "SYNC_ENV_FILE": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("upsync: invalid command line: keys comes first")


# ----- the keys, used for real -----------------------------------------------------------------------------


@pytest.mark.integration
def test_topology_keys_work_against_a_jailed_sshd(workdir: Path, source: Path) -> None:
    out = workdir / "keys"
    assert keys(str(out), "--quiet").returncode == 0
    server = SshServer(workdir / "sshd", KeyPair(out / "sidecar"), KeyPair(out / "content", "ssh_host_ed25519_key"))
    # The sidecar's target is this sshd: the second run pins content's host key under its name and
    # jails the key in its directory; the keys themselves stay.
    target = f"ssh://{server.user}@127.0.0.1:{server.port}/"
    again = keys(str(out), "--quiet", "--content-targets", target, "--rrsync-dir", str(server.root))
    assert again.returncode == 0 and again.stderr.count("kept") == 4, again.stderr
    shutil.copyfile(out / "content/authorized_keys", server.authorized_keys)
    server.start()
    try:
        (source / "photo.jpg").write_bytes(os.urandom(4096))
        sidecar = Sidecar(
            source,
            target,
            KeyPair(out / "sidecar"),
            workdir,
            SYNC_SSH_KNOWN_HOSTS_FILE=str(out / "sidecar/known_hosts"),
        )
        proc = sidecar.run("once")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_converges(source, server.root)
    finally:
        server.stop()


@pytest.mark.integration
def test_one_client_key_and_the_lines_to_paste(workdir: Path, source: Path, host_key: KeyPair) -> None:
    out = workdir / "client"
    owner = [] if os.geteuid() != 0 else ["--owner", f"{os.getuid()}:{os.getgid()}"]
    server = SshServer(workdir / "sshd", KeyPair(workdir, "unused"), host_key)
    target = f"ssh://{server.user}@127.0.0.1:{server.port}/"
    # Without the host key: the authorized_keys line, and a command that prints the known_hosts line.
    first = keys(str(out), "--targets", target, "--rrsync-dir", str(server.root), *owner)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    authorized = next(line for line in lines if line.startswith("command="))
    assert authorized.startswith(f'command="/usr/bin/rrsync -wo {server.root}",restrict ssh-ed25519 ')
    assert f"echo \"[127.0.0.1]:{server.port} $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)\"" in lines
    assert not (out / "known_hosts").exists() and oct((out / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    # With it (the target's .pub file): known_hosts is written, the same key kept.
    second = keys(str(out), "--targets", target, "--rrsync-dir", str(server.root), "--host-key", str(host_key.public))
    assert second.returncode == 0 and "kept" in second.stderr, second.stderr
    known = (out / "known_hosts").read_text()
    assert known == f"[127.0.0.1]:{server.port} {public_key(host_key.public_text, '')}\n"
    assert known.rstrip("\n") in second.stdout.splitlines()
    # Pasted as printed, the line lets the sidecar in (and nothing but rrsync).
    server.authorized_keys.write_text(authorized + "\n")
    server.start()
    try:
        (source / "pasted.txt").write_text("works\n")
        sidecar = Sidecar(source, target, KeyPair(out), workdir, SYNC_SSH_KNOWN_HOSTS_FILE=str(out / "known_hosts"))
        proc = sidecar.run("once")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_converges(source, server.root)
    finally:
        server.stop()
