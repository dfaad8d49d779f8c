"""The reference node image (compose/node/) on its own, as docs/targets.md runs it, replicated into by the
real sidecar: the documented `docker run` lines and compose block, non-default settings, non-root mode,
and the bad values (exit 2, one line)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import KeyPair
from tests.targets import targetlib as t

pytestmark = pytest.mark.targets

# The root-mode capabilities docs/targets.md documents (and its `docker run` line adds).
ROOT_CAPS = ("CHOWN", "SETUID", "SETGID", "SYS_CHROOT", "KILL", "NET_BIND_SERVICE")
HARDENED = (
    "--read-only",
    "--tmpfs",
    "/run/upsync-node",
    "--security-opt",
    "no-new-privileges:true",
    "--cap-drop",
    "ALL",
)


@pytest.fixture(scope="module")
def documented_keys(client: KeyPair) -> Iterator[Path]:
    """A directory where the documented keys block ran, next to the sidecar's public key."""
    path = Path(tempfile.mkdtemp(prefix="upsync-targets-doc-"))
    path.chmod(0o755)
    shutil.copy(client.public, path / "upsync_ed25519.pub")
    t.run_block(t.doc_block("targets:node-keys"), cwd=path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _uids(node: t.Container) -> set[str]:
    """The uids the node's processes run as."""
    lines = t.run(["docker", "top", node.name, "-eo", "pid,uid"]).stdout.decode().splitlines()
    return {line.split()[1] for line in lines[1:]}


def _owner(node: t.Container, path: str) -> str:
    return node.exec("stat", "-c", "%u:%g", path).stdout.decode().strip()


def test_documented_root_mode_run(node_image: str, network: str, documented_keys: Path, client: KeyPair, workdir: Path):
    command = t.shell_command(t.doc_block("targets:node-run-root"), "docker run")
    for cap in ROOT_CAPS:
        assert f"--cap-add {cap}" in command, f"the documented root-mode line lacks {cap}"
    copy = t.unique("copy")
    args = t.documented_run(
        command,
        name=t.unique("node-root"),
        keys_dir=documented_keys,
        replace={"upsync/node:local": node_image, "upsync_copy:": f"{copy}:"},
    )
    with t.started(lambda: t.docker_run(args, network=network, volumes=[copy])) as node:
        node.wait_listening(22, 80)
        assert node.exec("upsync-node-health", check=False).returncode == 0, node.logs()
        # The line the node logs is the line the sidecar pins (`host key` form, port 22).
        known = t.logged_known_hosts_line(node, node.ip)
        host_key = (documented_keys / "node-keys" / "ssh_host_ed25519_key.pub").read_text()
        assert known == t.known_hosts_line(node.ip, 22, host_key)
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}/", known):
            t.replicate_create_modify_delete(source, t.http_reader(f"http://{node.ip}"))
        # rsync wrote as the account; nginx's workers are www-data, sshd's per-connection parts root.
        assert _owner(node, "/srv/uploads/2026/12") == "10001:10001"


def test_documented_non_root_run(node_image: str, network: str, documented_keys: Path, client: KeyPair, workdir: Path):
    command = t.shell_command(t.doc_block("targets:node-run-nonroot"), "docker run")
    copy = t.unique("copy")
    args = t.documented_run(
        command,
        name=t.unique("node-nonroot"),
        keys_dir=documented_keys,
        replace={"upsync/node:local": node_image, "upsync_copy:": f"{copy}:"},
    )
    with t.started(lambda: t.docker_run(args, network=network, volumes=[copy])) as node:
        node.wait_listening(2222, 8080)
        assert node.exec("upsync-node-health", check=False).returncode == 0, node.logs()
        # Every process as the account's uid, with no capability at all.
        assert _uids(node) == {"10001"}
        assert "CapEff:\t0000000000000000" in node.exec("cat", "/proc/1/status").stdout.decode()
        known = t.logged_known_hosts_line(node, node.ip)
        assert known.startswith(f"[{node.ip}]:2222 ssh-ed25519 ")
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}:2222/", known):
            t.replicate_create_modify_delete(source, t.http_reader(f"http://{node.ip}:8080"))


def test_documented_compose_service(node_image: str, documented_keys: Path, client: KeyPair, workdir: Path):
    block = t.doc_block("targets:node-compose")
    assert "    ports:" in block
    # Host ports left out (the test reaches the container's address); this checkout's image.
    text = "".join(line + "\n" for line in block.splitlines() if not line.strip().startswith("ports:"))
    compose_file = documented_keys / "compose.yaml"
    compose_file.write_text(text.replace("image: upsync/node:local", f"image: {node_image}"))
    project = t.unique("compose")
    compose = ["docker", "compose", "-p", project, "-f", str(compose_file)]
    try:
        t.run([*compose, "up", "-d"], timeout=120)
        cid = t.run([*compose, "ps", "-q", "node"]).stdout.decode().strip()
        node = t.Container(cid, f"{project}_default")
        node.wait_listening(2222, 8080)
        known = t.logged_known_hosts_line(node, node.ip)
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}:2222/", known):
            t.replicate_create_modify_delete(source, t.http_reader(f"http://{node.ip}:8080"), deletes=False)
        # The keys came from the secrets (0444 files), not from /etc/upsync/node.
        assert "/run/secrets/node_host_key" in node.exec("env").stdout.decode()
    finally:
        print(t.run([*compose, "logs", "--no-color"], check=False).stdout.decode(errors="replace")[-6000:])
        t.run([*compose, "down", "-v", "-t", "5"], check=False, timeout=120)


def _kubernetes_secret(directory: Path, files: dict[str, str]) -> Path:
    """A Kubernetes Secret volume's layout: the files in a timestamped directory, reached through
    ``..data`` and one symlink per key; 0644 (the default mode), root's."""
    data = directory / "..2026_12_01_00_00_00.000000001"
    data.mkdir(parents=True)
    for name, text in files.items():
        (data / name).write_text(text)
        (data / name).chmod(0o644)
        (directory / name).symlink_to(f"..data/{name}")
    (directory / "..data").symlink_to(data.name)
    directory.chmod(0o755)
    return directory


def test_root_mode_other_directory_uid_and_ports_with_symlinked_secrets(
    node_image: str, network: str, client: KeyPair, workdir: Path
):
    keys = workdir / "keys"
    keys.mkdir()
    host = KeyPair(keys, "host")
    secret = _kubernetes_secret(
        workdir / "secret",
        {
            "ssh_host_ed25519_key": host.private.read_text(),
            "authorized_keys": f'command="/usr/bin/rrsync -wo /data/copy",restrict {client.public_text}\n',
        },
    )
    copy = t.unique("copy")
    args = [
        "--name", t.unique("node-settings"), *HARDENED, *(a for cap in ROOT_CAPS for a in ("--cap-add", cap)),
        "-e", "NODE_UPLOADS_DIR=/data/copy", "-e", "NODE_UID=12345", "-e", "NODE_SSHD_PORT=2200",
        "-e", "NODE_HTTP_PORT=8088",
        "-e", "NODE_HOST_KEY_FILE=/etc/upsync/secret/ssh_host_ed25519_key",
        "-e", "NODE_AUTHORIZED_KEYS_FILE=/etc/upsync/secret/authorized_keys",
        "-v", f"{secret}:/etc/upsync/secret:ro", "--mount", f"type=volume,src={copy},dst=/data/copy",
        node_image,
    ]  # fmt: skip
    with t.started(lambda: t.docker_run(args, network=network, volumes=[copy])) as node:
        node.wait_listening(2200, 8088)
        assert node.exec("upsync-node-health", check=False).returncode == 0, node.logs()
        known = t.logged_known_hosts_line(node, node.ip)
        # The `[host]:port key` form for a port other than 22.
        assert known == t.known_hosts_line(node.ip, 2200, host.public_text)
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}:2200/", known):
            t.replicate_create_modify_delete(source, t.http_reader(f"http://{node.ip}:8088"))
        # The copy and what rsync wrote belong to NODE_UID, and NODE_GID followed it.
        assert _owner(node, "/data/copy") == "12345:12345"
        assert _owner(node, "/data/copy/2026/12") == "12345:12345"


def test_non_root_other_uid_sshd_only_with_docker_style_secrets(
    node_image: str, network: str, client: KeyPair, workdir: Path
):
    keys = workdir / "keys"
    keys.mkdir()
    host = KeyPair(keys, "host")
    authorized = keys / "authorized_keys"
    authorized.write_text(f'command="/usr/bin/rrsync -wo /srv/uploads",restrict {client.public_text}\n')
    for path in (host.private, authorized):
        path.chmod(0o444)  # as Docker secrets are mounted; root's
    args = [
        "--name", t.unique("node-sshd-only"), "--user", "4242:4242", *HARDENED,
        "--tmpfs", "/srv/uploads:uid=4242,gid=4242",
        "-e", "NODE_NGINX=false",
        "-e", "NODE_HOST_KEY_FILE=/run/secrets/host_key",
        "-e", "NODE_AUTHORIZED_KEYS_FILE=/run/secrets/authorized_keys",
        "-v", f"{host.private}:/run/secrets/host_key:ro", "-v", f"{authorized}:/run/secrets/authorized_keys:ro",
        node_image,
    ]  # fmt: skip
    with t.started(lambda: t.docker_run(args, network=network)) as node:
        node.wait_listening(2222)
        assert node.exec("upsync-node-health", check=False).returncode == 0, node.logs()
        assert _uids(node) == {"4242"}
        with socket.socket() as s:  # no nginx
            s.settimeout(2)
            assert s.connect_ex((node.ip, 8080)) != 0
        known = t.logged_known_hosts_line(node, node.ip)
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}:2222/", known):
            t.replicate_create_modify_delete(source, t.disk_reader(node, "/srv/uploads"))
        assert _owner(node, "/srv/uploads/2026/12") == "4242:4242"


# ----- bad values ---------------------------------------------------------------------------------------

_KEY_HINT = "mount it: a volume, a Docker secret or a Kubernetes Secret; compose: the keys volume at /etc/upsync/node"
BAD_VALUES = [
    (["-e", "NODE_UID=x"], 'node: invalid NODE_UID="x": must be a number from 1 to 2147483647'),
    (
        ["-e", "NODE_UID=33"],
        'node: invalid NODE_UID="33": must be a uid that is not another account\'s (33 is www-data in the image)',
    ),
    (["-e", "NODE_GID=-1"], 'node: invalid NODE_GID="-1": must be a number from 1 to 2147483647'),
    (["-e", "NODE_SSHD_PORT=0"], 'node: invalid NODE_SSHD_PORT="0": must be a port number from 1 to 65535'),
    (["-e", "NODE_HTTP_PORT=70000"], 'node: invalid NODE_HTTP_PORT="70000": must be a port number from 1 to 65535'),
    (["-e", "NODE_HTTP_PORT=22"], 'node: invalid NODE_HTTP_PORT="22": must be another port than NODE_SSHD_PORT'),
    (["-e", "NODE_NGINX=maybe"], 'node: invalid NODE_NGINX="maybe": must be true or false'),
    (
        ["-e", "NODE_UPLOADS_DIR=srv/uploads"],
        'node: invalid NODE_UPLOADS_DIR="srv/uploads": must be an absolute path of letters, digits and ._- '
        "(not / itself, no . or .. parts)",
    ),
    (["-e", "NODE_UPSTREAM=app:80/x"], 'node: invalid NODE_UPSTREAM="app:80/x": must be host[:port]'),
    (
        ["-e", "NODE_HOST_KEY_FILE=/run/secrets/missing"],
        'node: invalid NODE_HOST_KEY_FILE="/run/secrets/missing": must be an existing file holding '
        f"the node's ssh host private key ({_KEY_HINT})",
    ),
    (
        ["-e", "NODE_HOST_KEY_FILE=/etc/upsync/node/authorized_keys"],
        'node: invalid NODE_HOST_KEY_FILE="/etc/upsync/node/authorized_keys": must be an OpenSSH private key '
        "without a passphrase (make one: ssh-keygen -t ed25519 -N '' -f FILE)",
    ),
    (
        ["-e", "NODE_AUTHORIZED_KEYS_FILE=/etc/upsync/node/ssh_host_ed25519_key"],
        'node: invalid NODE_AUTHORIZED_KEYS_FILE="/etc/upsync/node/ssh_host_ed25519_key": must be an '
        "authorized_keys file of public keys, not a private key",
    ),
    (
        ["-e", "NODE_AUTHORIZED_KEYS_FILE=/etc/hostname"],
        'node: invalid NODE_AUTHORIZED_KEYS_FILE="/etc/hostname": must be an '
        "authorized_keys file with at least one public key line",
    ),
    (
        ["--user", "10001:10001", "-e", "NODE_UID=10002"],
        'node: invalid NODE_UID="10002": must be the container\'s own id (10001) '
        "when the node runs as non-root, or unset",
    ),
    (
        # As on Kubernetes, where unprivileged processes cannot bind ports below 1024.
        ["--user", "10001:10001", "--sysctl", "net.ipv4.ip_unprivileged_port_start=1024", "-e", "NODE_HTTP_PORT=80"],
        'node: invalid NODE_HTTP_PORT="80": must be a port from 1024 to 65535 '
        "when the node runs as non-root (uid 10001)",
    ),
]


@pytest.mark.parametrize(("extra", "line"), BAD_VALUES, ids=[" ".join(a[-1:]) for a, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line(node_image: str, documented_keys: Path, extra: list[str], line: str):
    keys = documented_keys / "node-keys"
    proc = t.run(
        ["docker", "run", "--rm", *HARDENED, "-v", f"{keys}:/etc/upsync/node:ro", *extra, node_image],
        check=False,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert (proc.returncode, err) == (2, line + "\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a key file of another uid)")
def test_key_file_root_cannot_read_exits_2_with_one_line(node_image: str, documented_keys: Path, workdir: Path):
    # Another uid's 0600 file: root in the container cannot read it without CAP_DAC_OVERRIDE.
    key = workdir / "host_key"
    shutil.copy(documented_keys / "node-keys" / "ssh_host_ed25519_key", key)
    os.chown(key, 12345, 12345)
    key.chmod(0o600)
    proc = t.run(
        ["docker", "run", "--rm", *HARDENED, "-v", f"{key}:/run/secrets/host_key:ro",
         "-e", "NODE_HOST_KEY_FILE=/run/secrets/host_key", node_image],
        check=False,
        timeout=60,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr.decode()) == (
        2,
        'node: invalid NODE_HOST_KEY_FILE="/run/secrets/host_key": must be readable by uid 0 '
        "(give the file a mode or group that lets it read: 0444, or 0440 and its group)\n",
    )


def test_no_writable_runtime_directory_exits_2_with_one_line(node_image: str, documented_keys: Path):
    keys = documented_keys / "node-keys"
    proc = t.run(
        ["docker", "run", "--rm", "--read-only", "-v", f"{keys}:/etc/upsync/node:ro", node_image],
        check=False,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr.decode()) == (
        2,
        "node: cannot write to /run/upsync-node as uid 0: mount a tmpfs there (docker run --tmpfs /run/upsync-node, "
        "compose tmpfs: [/run/upsync-node], a Kubernetes emptyDir)\n",
    )


def test_settings_table_names_every_variable_the_node_reads():
    node_sh = (t.REPO / "compose" / "node" / "node.sh").read_text()
    read = set(re.findall(r"\bNODE_[A-Z_]+\b", node_sh))
    table = t.doc_text().split("<!-- node-settings:start -->")[1].split("<!-- node-settings:end -->")[0]
    documented = set(re.findall(r"^\| `(NODE_[A-Z_]+)`", table, re.MULTILINE))
    assert read == documented, (
        f"read but not documented: {read - documented}; documented but not read: {documented - read}"
    )
