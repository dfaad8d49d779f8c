"""The persistent ssh link against a real sshd: reuse, reconnect, and errors that say what to fix."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from sidecar.ssh import SshError, SshLink, private_key, write_ssh_config
from sidecar.targets import parse_target
from tests.helpers import wait_until
from tests.sshd import KeyPair, SshServer

pytestmark = pytest.mark.integration


def make_link(sshd: SshServer, key: Path, known_hosts: Path, workdir: Path, policy: str = "strict") -> SshLink:
    runtime = workdir / "rt"
    runtime.mkdir(mode=0o700, exist_ok=True)
    cfg = write_ssh_config(runtime, key, known_hosts, policy, 5)
    return SshLink(parse_target(sshd.url), cfg, runtime / "c.sock", 5, known_hosts, key)


def test_master_is_reused_and_restarted(sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    link = make_link(sshd, client_key.private, sshd.known_hosts, workdir)
    try:
        assert link.ensure() is True
        assert link.ensure() is False  # already up: no new handshake
        pid = link.master_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)  # the connection dies
        wait_until(lambda: not link.alive(), 5, "the master to be gone")
        assert link.ensure() is True and link.starts == 2
    finally:
        link.close()
    assert not link.socket.exists()


def test_unknown_host_key_names_fingerprint_and_how_to_pin(
    sshd: SshServer, client_key: KeyPair, host_key: KeyPair, workdir: Path
) -> None:
    empty = workdir / "empty_known_hosts"
    empty.write_text("")
    link = make_link(sshd, client_key.private, empty, workdir)
    with pytest.raises(SshError) as exc:
        link.ensure()
    fp = (
        __import__("subprocess")
        .run(["ssh-keygen", "-lf", str(host_key.public)], capture_output=True, text=True)
        .stdout.split()[1]
    )
    msg = str(exc.value)
    assert exc.value.reason == "host_key"
    assert f"host key of [127.0.0.1]:{sshd.port} is not pinned in {empty}" in msg
    assert f"the server offers ED25519 {fp}" in msg
    assert f"echo '{sshd.known_hosts_line()}' >> {empty}" in msg
    assert "\n" not in msg


def test_changed_host_key_is_refused(sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    other = KeyPair(workdir, "other-host")
    known = workdir / "known_changed"
    kind, key = other.public_text.split()[:2]
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    with pytest.raises(SshError, match="does not match the one pinned") as exc:
        make_link(sshd, client_key.private, known, workdir).ensure()
    assert exc.value.reason == "host_key"


def test_accept_new_pins_on_first_use(sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    known = workdir / "tofu_known_hosts"
    link = make_link(sshd, client_key.private, known, workdir, policy="accept-new")
    try:
        link.ensure()
    finally:
        link.close()
    assert sshd.host_key.public_text.split()[1] in known.read_text()


def test_wrong_key_is_an_auth_error(sshd: SshServer, workdir: Path) -> None:
    stranger = KeyPair(workdir, "stranger")
    with pytest.raises(SshError, match="refused the key") as exc:
        make_link(sshd, stranger.private, sshd.known_hosts, workdir).ensure()
    assert exc.value.reason == "auth"
    assert "authorized_keys" in str(exc.value)


def test_unreachable_is_a_network_error(sshd: SshServer, client_key: KeyPair, workdir: Path) -> None:
    sshd.stop()
    with pytest.raises(SshError, match="cannot reach") as exc:
        make_link(sshd, client_key.private, sshd.known_hosts, workdir).ensure()
    assert exc.value.reason == "network"


def test_world_readable_key_is_used_through_a_private_copy(client_key: KeyPair, workdir: Path) -> None:
    loose = workdir / "loose_key"
    loose.write_bytes(client_key.private.read_bytes())
    loose.chmod(0o644)
    runtime = workdir / "rt2"
    runtime.mkdir(mode=0o700)
    copy = private_key(loose, runtime)
    assert copy != loose and copy.stat().st_mode & 0o777 == 0o600
    assert copy.read_bytes() == loose.read_bytes()
    tight = workdir / "tight_key"
    tight.write_bytes(client_key.private.read_bytes())
    tight.chmod(0o600)
    assert private_key(tight, runtime) == tight
