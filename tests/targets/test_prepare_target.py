"""docs/targets.md "Prepare a target", followed literally: the Dockerfile fragment on a plain nginx image,
and the VM steps on a Debian host (a container standing in for it). The real sidecar replicates into
each; what counts is what nginx serves. Also the troubleshooting rows: the documented log lines."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Sidecar
from tests.sshd import KeyPair
from tests.targets import targetlib as t

pytestmark = pytest.mark.targets

# plain nginx stand-in: build arg SECURITY -> the rsync Debian installs from those sources.
VARIANTS = {"bookworm-security": ("yes", "3.5.0"), "bookworm": ("no", "3.2.7")}
UPLOADS = "/usr/share/nginx/html/wp-content/uploads"


def _plain_nginx(variant: str) -> str:
    security, _ = VARIANTS[variant]
    return t.build(
        f"upsync/targets-plain-nginx:{variant}-{t.TAG}", t.PLAIN_NGINX.read_text(), build_args=[f"SECURITY={security}"]
    )


def _with_fragment(variant: str) -> str:
    """The plain image + the fragment, exactly as docs/targets.md has it."""
    fragment = t.doc_block("targets:dockerfile-fragment")
    return t.build(f"upsync/targets-nginx-fragment:{variant}-{t.TAG}", f"FROM {_plain_nginx(variant)}\n{fragment}")


def _keys_for(directory: Path, client: KeyPair) -> Path:
    """The node-keys directory as the docs make it, with the fragment's directory in authorized_keys."""
    directory.chmod(0o755)
    shutil.copy(client.public, directory / "upsync_ed25519.pub")
    t.run_block(t.doc_block("targets:node-keys"), cwd=directory)
    authorized = directory / "node-keys" / "authorized_keys"
    authorized.chmod(0o644)
    authorized.write_text(authorized.read_text().replace("rrsync -wo /srv/uploads", f"rrsync -wo {UPLOADS}"))
    return directory


def _run_documented(image: str, keys: Path, network: str) -> t.Container:
    command = t.shell_command(t.doc_block("targets:fragment-run"), "docker run")
    copy = t.unique("copy")
    args = t.documented_run(
        command,
        name=t.unique("fragment"),
        keys_dir=keys,
        replace={"my-nginx-target": image, "nginx_uploads:": f"{copy}:"},
    )
    return t.docker_run(args, network=network, volumes=[copy])


@dataclass
class Target:
    variant: str
    rsync: str
    node: t.Container
    source: Path
    sidecar: Sidecar

    def read(self, rel: str) -> bytes | None:
        return t.http_reader(f"http://{self.node.ip}")(rel)


@pytest.fixture(scope="module", params=list(VARIANTS))
def fragment_target(request: pytest.FixtureRequest, network: str, client: KeyPair) -> Iterator[Target]:
    variant = request.param
    image = _with_fragment(variant)
    work = Path(tempfile.mkdtemp(prefix="upsync-targets-fragment-"))
    keys = _keys_for(work, client)
    try:
        with t.started(lambda: _run_documented(image, keys, network)) as node:
            node.wait_listening(22, 80)
            public = (keys / "node-keys" / "ssh_host_ed25519_key.pub").read_text()
            source = t.make_source(work)
            known = t.known_hosts_line(node.ip, 22, public)
            with t.sidecar_to(source, work, client, f"ssh://upsync@{node.ip}/", known) as sidecar:
                yield Target(variant, VARIANTS[variant][1], node, source, sidecar)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fragment_installs_debians_rsync(fragment_target: Target):
    out = fragment_target.node.exec("rsync", "--version").stdout.decode()
    assert out.startswith(f"rsync  version {fragment_target.rsync} "), out.splitlines()[0]


def test_fragment_created_file_is_served_by_nginx(fragment_target: Target):
    data = t.write(fragment_target.source, "2026/12/photo.jpg")
    # and a directory of them, deleted by a later test
    album = {rel: t.write(fragment_target.source, rel, 4096) for rel in ("album/a.jpg", "album/sub/b.jpg")}
    t.wait_content(fragment_target.read, "2026/12/photo.jpg", data, "a created file")
    for rel, content in album.items():
        t.wait_content(fragment_target.read, rel, content, "a created directory's files")
    # written by the account, readable by nginx
    owner = fragment_target.node.exec("stat", "-c", "%U %a", f"{UPLOADS}/2026/12/photo.jpg").stdout.decode().split()
    assert owner == ["upsync", "644"]


def test_fragment_modified_file_is_served_new(fragment_target: Target):
    data = t.write(fragment_target.source, "2026/12/photo.jpg", size=70001)
    t.wait_content(fragment_target.read, "2026/12/photo.jpg", data, "a modified file")


def test_fragment_deleted_file_gives_404(fragment_target: Target):
    # 3.2.7 receivers too: the daemon deletes by filter rules there.
    timeout = t.SERVED_TIMEOUT
    (fragment_target.source / "2026/12/photo.jpg").unlink()
    t.wait_content(fragment_target.read, "2026/12/photo.jpg", None, "a deleted file", timeout)


def test_fragment_deleted_directory_gives_404(fragment_target: Target):
    timeout = t.SERVED_TIMEOUT
    shutil.rmtree(fragment_target.source / "album")
    for rel in ("album/a.jpg", "album/sub/b.jpg"):
        t.wait_content(fragment_target.read, rel, None, "a deleted directory's files", timeout)
    assert fragment_target.read("album/") is None


# ----- troubleshooting: the documented sshd log lines ----------------------------------------------------


@pytest.fixture(scope="module")
def fragment_for_faults(network: str, client: KeyPair) -> Iterator[tuple[t.Container, Path, str]]:
    image = _with_fragment("bookworm-security")
    work = Path(tempfile.mkdtemp(prefix="upsync-targets-faults-"))
    keys = _keys_for(work, client)
    try:
        with t.started(lambda: _run_documented(image, keys, network)) as node:
            node.wait_listening(22, 80)
            public = (keys / "node-keys" / "ssh_host_ed25519_key.pub").read_text()
            yield node, t.make_source(work), t.known_hosts_line(node.ip, 22, public)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(node: t.Container, source: Path, known: str, client: KeyPair, workdir: Path) -> tuple[int, str]:
    with t.sidecar_to(source, workdir, client, f"ssh://upsync@{node.ip}/", known, watch=False) as sidecar:
        proc = sidecar.run("check")
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("break_it", "repair", "logged"),
    [
        (
            ["usermod", "-p", "!", "upsync"],
            ["usermod", "-p", "*", "upsync"],
            "User upsync not allowed because account is locked",
        ),
        (
            ["chmod", "g+w", "/run/upsync/home/authorized_keys"],
            ["chmod", "0644", "/run/upsync/home/authorized_keys"],
            "Authentication refused: bad ownership or modes for file /run/upsync/home/authorized_keys",
        ),
        (
            ["chmod", "0777", "/run/upsync/home"],
            ["chmod", "0755", "/run/upsync/home"],
            "Authentication refused: bad ownership or modes for directory /run/upsync/home",
        ),
    ],
    ids=["locked-account", "writable-authorized-keys", "writable-home"],
)
def test_troubleshooting_row_shows_the_documented_log_line(
    fragment_for_faults: tuple[t.Container, Path, str],
    client: KeyPair,
    workdir: Path,
    break_it: list[str],
    repair: list[str],
    logged: str,
):
    node, source, known = fragment_for_faults
    assert f"`{logged}`" in t.doc_text(), "the troubleshooting table no longer shows this line"
    node.exec(*break_it)
    try:
        code, out = _check(node, source, known, client, workdir)
        assert code == 1 and "Permission denied (publickey)" in out, out
        t.wait_for(lambda: logged in node.logs(), 10, f"sshd to log {logged!r}")
    finally:
        node.exec(*repair)
    code, out = _check(node, source, known, client, workdir)
    assert code == 0 and "sent and deleted a probe file as batches do" in out, out


# ----- a VM or bare Debian host -----------------------------------------------------------------------

# Debian with nginx on its default site, standing in for a host, and the documented packages block
# run on it (a cached layer: the build context holds only that block, so it is rebuilt when it changes).
VM_BASE = """FROM debian:bookworm-slim
RUN set -eux; \\
    if ! grep -rqs bookworm-security /etc/apt/sources.list /etc/apt/sources.list.d/; then \\
        echo 'deb http://deb.debian.org/debian-security bookworm-security main' \\
            > /etc/apt/sources.list.d/security.list; \\
    fi; \\
    apt-get update; \\
    apt-get install -y --no-install-recommends nginx; \\
    rm -rf /var/lib/apt/lists/*
COPY packages.sh /root/
RUN cd /root && bash -Eeuo pipefail packages.sh
"""
# The account steps as root in /root, with this run's key; systemd would make /run/sshd and start sshd.
VM_STEPS = """FROM {base}
WORKDIR /root
COPY steps.sh upsync_ed25519.pub /root/
RUN mkdir -p /run/sshd && bash -Eeuo pipefail steps.sh
CMD ["sh", "-c", "mkdir -p /run/sshd && /usr/sbin/sshd -D -e & exec nginx -g 'daemon off;'"]
"""


@pytest.fixture(scope="module")
def vm(network: str, client: KeyPair) -> Iterator[t.Container]:
    context = Path(tempfile.mkdtemp(prefix="upsync-targets-vm-"))
    try:
        (context / "base").mkdir()
        (context / "base" / "packages.sh").write_text(t.doc_block("targets:vm-packages"))
        base = t.build(f"upsync/targets-vm-base:{t.TAG}", VM_BASE, context=context / "base")
        (context / "steps").mkdir()
        (context / "steps" / "steps.sh").write_text(t.doc_block("targets:vm-steps"))
        shutil.copy(client.public, context / "steps" / "upsync_ed25519.pub")
        image = t.build(f"upsync/targets-vm:{t.TAG}", VM_STEPS.format(base=base), context=context / "steps")
        with t.started(lambda: t.docker_run(["--name", t.unique("vm"), image], network=network)) as host:
            host.wait_listening(22, 80)
            yield host
    finally:
        shutil.rmtree(context, ignore_errors=True)


def _vm_known_hosts(host: t.Container) -> str:
    """The documented port-22 echo line, run on the host with its address for the name."""
    block = t.doc_block("targets:known-hosts")
    line = next(x for x in block.splitlines() if x.startswith("echo") and "# port 22" in x)
    line = line.split("#")[0].replace("content.example.net", host.ip)
    return host.exec("sh", "-c", line).stdout.decode().strip()


def test_vm_steps_replicate_and_nginx_serves(vm: t.Container, client: KeyPair, workdir: Path):
    known = _vm_known_hosts(vm)
    assert known.startswith(f"{vm.ip} ssh-ed25519 ")
    source = t.make_source(workdir)
    with t.sidecar_to(source, workdir, client, f"ssh://upsync@{vm.ip}/", known):
        t.replicate_create_modify_delete(source, t.http_reader(f"http://{vm.ip}"))


def test_vm_steps_leave_other_accounts_alone(vm: t.Container):
    def effective(user: str) -> str:
        return vm.exec("sshd", "-T", "-C", f"user={user},host=x,addr=1.2.3.4").stdout.decode()

    assert "forcecommand /usr/bin/rrsync -wo /var/www/html/wp-content/uploads\n" in effective("upsync")
    assert "permittty no\n" in effective("upsync")
    root = effective("root")
    assert "forcecommand none\n" in root and "permittty yes\n" in root


def test_vm_stock_sshd_with_pam_lets_a_locked_account_in(vm: t.Container, client: KeyPair, workdir: Path):
    # As the docs say: only sshd without PAM refuses "!"; "*" works either way.
    vm.exec("usermod", "-p", "!", "upsync")
    try:
        source = t.make_source(workdir)
        with t.sidecar_to(source, workdir, client, f"ssh://upsync@{vm.ip}/", _vm_known_hosts(vm), watch=False) as s:
            proc = s.run("check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        vm.exec("usermod", "-p", "*", "upsync")
