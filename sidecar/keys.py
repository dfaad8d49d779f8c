"""Make the ssh keys of an upsync deployment: ``python -m sidecar keys DIR``.

Two uses, one way of making keys:

* **The topology** (compose, Docker Swarm, Kubernetes): every key of the reference deployment, one
  subdirectory per consumer, so each consumer can be given its own and nothing else::

      DIR/sidecar/  id_ed25519(.pub), known_hosts  "content ..."            (client of content)
      DIR/fanout/   id_ed25519(.pub), known_hosts  "web,tasks.web ..."      (client of every web node)
      DIR/content/  ssh_host_ed25519_key(.pub), authorized_keys  (the sidecar's key, rrsync -wo)
      DIR/web/      ssh_host_ed25519_key(.pub), authorized_keys  (the fanout's key, rrsync -wo)

  Prints how to load them as Docker Swarm secrets and as Kubernetes Secrets, under the names
  ``deploy/swarm/stack.yml`` and ``deploy/kubernetes/`` use.
* **One client** (``--targets``): a key for a sidecar added to an existing stack, owned as the
  sidecar runs (``--owner``); prints the ``authorized_keys`` line for the target account and the
  ``known_hosts`` line (``[host]:port`` off port 22) to paste.

Idempotent: an existing key is kept (its ``.pub`` is remade from it if missing or different); the
derived files (``known_hosts``, ``authorized_keys``), owners and modes are rewritten on every run, so
a change of uid or name applies at the next run. To rotate a key, delete it and run again.

The decisions (what goes in which file, names, owners and modes) are pure functions below; the file
system and ``ssh-keygen`` are touched only by :class:`Writer` and :func:`main`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .targets import TargetError, parse_targets

__all__ = [
    "KeySpec",
    "KeysError",
    "Owner",
    "Topology",
    "authorized_keys_line",
    "fingerprint",
    "known_hosts_line",
    "known_hosts_names",
    "kubernetes_commands",
    "main",
    "parse_owner",
    "public_key",
    "swarm_commands",
    "topology_files",
    "topology_keys",
]

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ENVIRONMENT = 3

KEY_NAME = "id_ed25519"
HOST_KEY_NAME = "ssh_host_ed25519_key"
RRSYNC = "/usr/bin/rrsync"
DEFAULT_RRSYNC_DIR = "/srv/uploads"
# The fanout's target is dns+ssh://upsync@web/ (compose, Kubernetes) or dns+ssh://upsync@tasks.web/
# (Swarm): one host key, pinned under both names, serves all three.
DEFAULT_CONTENT_TARGETS = "ssh://upsync@content/"
DEFAULT_WEB_TARGETS = "dns+ssh://upsync@web/,dns+ssh://upsync@tasks.web/"
DEFAULT_NAME = "upsync"
DEFAULT_NAMESPACE = "upsync"

_RRSYNC_DIR_RE = re.compile(r"^/[A-Za-z0-9_.@+/-]*$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)

CLIENT_DIR_MODE = 0o700
NODE_DIR_MODE = 0o755
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


class KeysError(Exception):
    """Bad input: ``str()`` is the one line shown (after ``upsync: ``); exit 2."""


class KeysFailure(Exception):
    """The keys could not be written (permissions, a full disk, ssh-keygen failed); exit 1."""


# ----- pure: what to make ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


def parse_owner(text: str, flag: str) -> Owner:
    """``UID`` or ``UID:GID`` (numeric: the consumer's image may have no such user name here).

    Example:
        >>> parse_owner("33", "--owner"), parse_owner("10001:0", "--owner")
        (Owner(uid=33, gid=33), Owner(uid=10001, gid=0))
    """
    uid, colon, gid = text.partition(":")
    if not uid.isdigit() or (colon and not gid.isdigit()) or int(uid) > 2**31 or int(gid or 0) > 2**31:
        raise KeysError(f'invalid {flag}="{text}": must be a numeric UID or UID:GID (e.g. 33:33)')
    return Owner(int(uid), int(gid) if colon else int(uid))


def public_key(text: str, what: str) -> str:
    """The ``type base64`` part of a public key line (options and comment dropped), checked.

    Example:
        >>> public_key('command="x",restrict ssh-ed25519 AAAAC3Nz comment', "x")
        'ssh-ed25519 AAAAC3Nz'
    """
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word in _KEY_TYPES:
            blob = words[i + 1]
            try:
                base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                break
            return f"{word} {blob}"
    raise KeysError(f"invalid {what}: must be an ssh public key (ssh-ed25519 AAAA...), as in a .pub file")


def fingerprint(pub: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key (what ``ssh-keygen -l`` and sshd's log show).

    Example:
        >>> fingerprint("ssh-ed25519 AAAAC3Nz")
        'SHA256:aR5vv7GWTQFZPb8C8fzSCMkmK4xSoxT5dPn+9RTgx30'
    """
    blob = base64.b64decode(pub.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def known_hosts_names(targets: str, flag: str) -> tuple[str, ...]:
    """The names ssh looks a host key up under for these targets, in order, without repeats.

    ``[host]:port`` off port 22; a ``dns+ssh://`` target's name without a port (the sidecar checks every
    address it resolves to as that name, ssh's ``HostKeyAlias``).

    Example:
        >>> known_hosts_names("ssh://u@content/, ssh://u@content.example:2222/, dns+ssh://u@web:2222/", "--x")
        ('content', '[content.example]:2222', 'web')
    """
    try:
        parsed = parse_targets(targets)
    except TargetError as exc:
        raise KeysError(f'invalid {flag}="{targets}": {exc}') from None
    names: list[str] = []
    for target in parsed:
        name = target.host if target.resolve_all else target.known_hosts_name
        if name not in names:
            names.append(name)
    return tuple(names)


def known_hosts_line(names: Sequence[str], pub: str) -> str:
    """One known_hosts line pinning ``pub`` under every name.

    Example:
        >>> known_hosts_line(["web", "tasks.web"], "ssh-ed25519 AAAA")
        'web,tasks.web ssh-ed25519 AAAA\\n'
    """
    return f"{','.join(names)} {pub}\n"


def check_rrsync_dir(path: str) -> str:
    if not _RRSYNC_DIR_RE.match(path) or "/../" in path + "/" or "//" in path:
        raise KeysError(
            f'invalid --rrsync-dir="{path}": must be an absolute path of letters, digits and _.@+/- (e.g. /srv/uploads)'
        )
    return path


def authorized_keys_line(pub: str, rrsync_dir: str, comment: str) -> str:
    """The target account's line for a client key: whatever the key asks, it runs ``rrsync -wo DIR``
    (write-only, jailed), with no pty, forwarding, agent or X11 (``restrict``).

    Example:
        >>> authorized_keys_line("ssh-ed25519 AAAA", "/srv/uploads", "upsync-sidecar")
        'command="/usr/bin/rrsync -wo /srv/uploads",restrict ssh-ed25519 AAAA upsync-sidecar\\n'
    """
    return f'command="{RRSYNC} -wo {rrsync_dir}",restrict {pub} {comment}\n'


def check_name(text: str, flag: str) -> str:
    # Both a Swarm secret name and a Kubernetes object name (DNS-1123) once suffixed.
    if not _NAME_RE.match(text):
        raise KeysError(f'invalid {flag}="{text}": must be lowercase letters, digits and - (e.g. upsync), at most 40')
    return text


@dataclass(frozen=True)
class KeySpec:
    """A key pair to keep, or make if missing: ``rel`` (private) and ``rel.pub``."""

    rel: str
    comment: str
    owner: Owner | None


@dataclass(frozen=True)
class FileSpec:
    """A file written on every run (derived, or a directory: ``text`` None)."""

    rel: str
    text: str | None
    mode: int
    owner: Owner | None


@dataclass(frozen=True)
class Topology:
    """The reference deployment's keys. Owners ``None``: left as the files are made (no chown)."""

    sidecar_owner: Owner | None = None
    fanout_owner: Owner | None = None
    node_owner: Owner | None = None
    content_names: tuple[str, ...] = ("content",)
    web_names: tuple[str, ...] = ("web", "tasks.web")
    rrsync_dir: str = DEFAULT_RRSYNC_DIR


# consumer -> (the consumer's key file, comment, whose client it is: the other side's consumer)
CLIENTS = {"sidecar": "content", "fanout": "web"}
NODES = {"content": "sidecar", "web": "fanout"}


def topology_keys(topo: Topology) -> list[KeySpec]:
    """The four key pairs: the two clients' keys and the two nodes' host keys (one for all web nodes).

    Example:
        >>> [k.rel for k in topology_keys(Topology())]
        ['sidecar/id_ed25519', 'fanout/id_ed25519', 'content/ssh_host_ed25519_key', 'web/ssh_host_ed25519_key']
    """
    return [
        KeySpec(f"sidecar/{KEY_NAME}", "upsync-sidecar", topo.sidecar_owner),
        KeySpec(f"fanout/{KEY_NAME}", "upsync-fanout", topo.fanout_owner),
        KeySpec(f"content/{HOST_KEY_NAME}", "upsync-content-host", topo.node_owner),
        KeySpec(f"web/{HOST_KEY_NAME}", "upsync-web-host", topo.node_owner),
    ]


def topology_files(topo: Topology, pubs: Mapping[str, str]) -> list[FileSpec]:
    """Directories, modes and the derived files, given each key's public part (by its ``rel``).

    Clients: their own 0700 directory, private key 0600, owned by the consumer's uid. Nodes: a 0755
    directory; the host key 0600 and ``authorized_keys`` 0644, owned by the node owner (root for an sshd
    started as root: sshd's StrictModes refuses an ``authorized_keys`` its login user could change).
    """
    client_pub = {c: pubs[f"{c}/{KEY_NAME}"] for c in CLIENTS}
    host_pub = {n: pubs[f"{n}/{HOST_KEY_NAME}"] for n in NODES}
    names = {"content": topo.content_names, "web": topo.web_names}
    owner = {"sidecar": topo.sidecar_owner, "fanout": topo.fanout_owner}
    files: list[FileSpec] = []
    for client, node in CLIENTS.items():
        files += [
            FileSpec(client, None, CLIENT_DIR_MODE, owner[client]),
            FileSpec(f"{client}/{KEY_NAME}", None, PRIVATE_MODE, owner[client]),
            FileSpec(f"{client}/{KEY_NAME}.pub", None, PUBLIC_MODE, owner[client]),
            FileSpec(
                f"{client}/known_hosts", known_hosts_line(names[node], host_pub[node]), PUBLIC_MODE, owner[client]
            ),
        ]
    for node, client in NODES.items():
        line = authorized_keys_line(client_pub[client], topo.rrsync_dir, f"upsync-{client}")
        files += [
            FileSpec(node, None, NODE_DIR_MODE, topo.node_owner),
            FileSpec(f"{node}/{HOST_KEY_NAME}", None, PRIVATE_MODE, topo.node_owner),
            FileSpec(f"{node}/{HOST_KEY_NAME}.pub", None, PUBLIC_MODE, topo.node_owner),
            FileSpec(f"{node}/authorized_keys", line, PUBLIC_MODE, topo.node_owner),
        ]
    return files


# Swarm: one secret per file (each is mounted as one file); the names deploy/swarm/stack.yml expects.
SWARM_SECRETS: tuple[tuple[str, str], ...] = (
    ("sidecar-key", f"sidecar/{KEY_NAME}"),
    ("sidecar-known-hosts", "sidecar/known_hosts"),
    ("fanout-key", f"fanout/{KEY_NAME}"),
    ("fanout-known-hosts", "fanout/known_hosts"),
    ("content-host-key", f"content/{HOST_KEY_NAME}"),
    ("content-authorized-keys", "content/authorized_keys"),
    ("web-host-key", f"web/{HOST_KEY_NAME}"),
    ("web-authorized-keys", "web/authorized_keys"),
)
# Kubernetes: one Secret per consumer, one key per file; the names deploy/kubernetes/ expects.
KUBERNETES_SECRETS: dict[str, tuple[str, ...]] = {
    "sidecar": (KEY_NAME, "known_hosts"),
    "fanout": (KEY_NAME, "known_hosts"),
    "content": (HOST_KEY_NAME, "authorized_keys"),
    "web": (HOST_KEY_NAME, "authorized_keys"),
}


def swarm_commands(shown_dir: str, name: str) -> list[str]:
    """``docker secret create`` for each file, skipped when the secret exists (secrets are immutable).

    Example:
        >>> swarm_commands("keys", "upsync")[0]  # doctest: +NORMALIZE_WHITESPACE
        'docker secret inspect upsync-sidecar-key >/dev/null 2>&1
         || docker secret create upsync-sidecar-key keys/sidecar/id_ed25519'
    """
    out = []
    for suffix, rel in SWARM_SECRETS:
        secret = f"{name}-{suffix}"
        path = shlex.quote(f"{shown_dir}/{rel}")
        out.append(f"docker secret inspect {secret} >/dev/null 2>&1 || docker secret create {secret} {path}")
    return out


def kubernetes_commands(shown_dir: str, name: str, namespace: str) -> list[str]:
    """One ``kubectl create secret generic`` per consumer, applied (so a second run updates it).

    Example:
        >>> kubernetes_commands("keys", "upsync", "upsync")[0]  # doctest: +NORMALIZE_WHITESPACE
        'kubectl -n upsync create secret generic upsync-sidecar-ssh
         --from-file=id_ed25519=keys/sidecar/id_ed25519 --from-file=known_hosts=keys/sidecar/known_hosts
         --dry-run=client -o yaml | kubectl -n upsync apply -f -'
    """
    out = []
    for consumer, files in KUBERNETES_SECRETS.items():
        sources = " ".join(f"--from-file={f}={shlex.quote(f'{shown_dir}/{consumer}/{f}')}" for f in files)
        out.append(
            f"kubectl -n {namespace} create secret generic {name}-{consumer}-ssh {sources} "
            f"--dry-run=client -o yaml | kubectl -n {namespace} apply -f -"
        )
    return out


def client_files(owner: Owner | None, known_hosts: str | None) -> list[FileSpec]:
    """One client's directory: the key owned as the sidecar runs; known_hosts when the host key is given."""
    files = [
        FileSpec(".", None, CLIENT_DIR_MODE, owner),
        FileSpec(KEY_NAME, None, PRIVATE_MODE, owner),
        FileSpec(f"{KEY_NAME}.pub", None, PUBLIC_MODE, owner),
    ]
    if known_hosts is not None:
        files.append(FileSpec("known_hosts", known_hosts, PUBLIC_MODE, owner))
    return files


# ----- I/O -----------------------------------------------------------------------------------------


class Writer:
    """Everything that touches the file system or runs ``ssh-keygen``, under one directory."""

    def __init__(self, root: Path, ssh_keygen: str) -> None:
        self.root = root
        self.ssh_keygen = ssh_keygen

    def _path(self, rel: str) -> Path:
        return self.root if rel == "." else self.root / rel

    def _keygen(self, *args: str) -> str:
        proc = subprocess.run(
            [self.ssh_keygen, *args], capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise KeysFailure(f"ssh-keygen {' '.join(args)} failed: {detail}")
        return proc.stdout

    def mkdir(self, rel: str) -> None:
        path = self._path(rel)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeysFailure(f"cannot make the directory {path}: {exc.strerror}") from None
        if not path.is_dir():
            raise KeysError(f"invalid DIR: {path} must be a directory")

    def keypair(self, spec: KeySpec) -> tuple[str, bool]:
        """The key's public part, and whether it was made now (kept otherwise)."""
        path = self._path(spec.rel)
        pub_path = path.with_name(path.name + ".pub")
        if path.is_file() and path.stat().st_size > 0:
            # The private key is the truth: its public part is read from it (ssh-keygen -y), and a
            # missing or different .pub is remade, never the key.
            with contextlib.suppress(OSError):
                os.chmod(path, PRIVATE_MODE)  # ssh-keygen refuses to read a key its owner left open
            try:
                pub = public_key(self._keygen("-y", "-f", str(path)), str(path))
            except KeysFailure as exc:
                raise KeysError(
                    f"invalid {path}: must be a private key without a passphrase ({exc}); "
                    "delete it to have a new one made"
                ) from None
            try:
                current = public_key(pub_path.read_text(), str(pub_path))
            except (OSError, KeysError):
                current = None
            if current != pub:
                self.write(f"{spec.rel}.pub", f"{pub} {spec.comment}\n", PUBLIC_MODE)
            return pub, False
        # Made under a temporary name and renamed: a reader (or a crash) never sees half a key pair.
        try:
            tmpdir = Path(tempfile.mkdtemp(prefix=".keygen-", dir=path.parent))
        except OSError as exc:
            raise KeysFailure(f"cannot write {path}: {exc.strerror}") from None
        try:
            tmp = tmpdir / "key"
            self._keygen("-q", "-t", "ed25519", "-N", "", "-C", spec.comment, "-f", str(tmp))
            os.replace(tmp.with_name("key.pub"), pub_path)
            os.replace(tmp, path)
        except OSError as exc:
            raise KeysFailure(f"cannot write {path}: {exc.strerror}") from None
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return public_key(pub_path.read_text(), str(pub_path)), True

    def write(self, rel: str, text: str, mode: int) -> None:
        """Atomically: a reader (a node starting meanwhile) sees the old file or the new one."""
        path = self._path(rel)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as fh:
                    fh.write(text)
                os.chmod(tmp, mode)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise KeysFailure(f"cannot write {path}: {exc.strerror}") from None

    def apply(self, spec: FileSpec) -> None:
        """Write a derived file, then set its mode and owner (a directory: mode and owner only)."""
        path = self._path(spec.rel)
        if spec.text is not None:
            self.write(spec.rel, spec.text, spec.mode)
        try:
            # Mode before owner: once given away, changing it would need CAP_FOWNER.
            os.chmod(path, spec.mode)
            if spec.owner is not None:
                os.chown(path, spec.owner.uid, spec.owner.gid)
        except PermissionError:
            raise KeysFailure(
                f"cannot give {path} mode {spec.mode:04o}" + (f" and owner {spec.owner}" if spec.owner else "") + ": "
                "permission denied (run as root, with CAP_CHOWN/CAP_FOWNER, or leave out the owner flags)"
            ) from None
        except OSError as exc:
            raise KeysFailure(f"cannot set the mode or owner of {path}: {exc.strerror}") from None


# ----- command line ----------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other bad input
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m sidecar keys",
        description="Make (or keep) every ssh key of an upsync deployment in DIR, and say how to load them. "
        "With --targets: one client key for a sidecar added to an existing stack, and the lines to paste.",
    )
    p.add_argument("dir", metavar="DIR", help="where the keys go (made if missing; existing keys are kept)")
    topo = p.add_argument_group("the reference topology (compose, Docker Swarm, Kubernetes)")
    topo.add_argument("--sidecar-owner", metavar="UID[:GID]", help="owner of sidecar/ (the uid the sidecar runs as)")
    topo.add_argument("--fanout-owner", metavar="UID[:GID]", help="owner of fanout/ (the uid the fanout runs as)")
    topo.add_argument("--node-owner", metavar="UID[:GID]", help="owner of content/ and web/ (the uid sshd starts as)")
    topo.add_argument(
        "--content-targets",
        metavar="TARGETS",
        default=DEFAULT_CONTENT_TARGETS,
        help=f"the sidecar's SYNC_TARGETS: content's host key is pinned under their names ({DEFAULT_CONTENT_TARGETS})",
    )
    topo.add_argument(
        "--web-targets",
        metavar="TARGETS",
        default=DEFAULT_WEB_TARGETS,
        help=f"the fanout's SYNC_TARGETS: the web host key is pinned under their names ({DEFAULT_WEB_TARGETS})",
    )
    topo.add_argument(
        "--name", default=DEFAULT_NAME, help=f"prefix of the Swarm/Kubernetes secret names ({DEFAULT_NAME})"
    )
    topo.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"Kubernetes namespace ({DEFAULT_NAMESPACE})")
    one = p.add_argument_group("one client key, for a sidecar added to an existing stack")
    one.add_argument(
        "--targets", metavar="TARGETS", help="the sidecar's SYNC_TARGETS (ssh://user@host[:port]/path,...)"
    )
    one.add_argument("--owner", metavar="UID[:GID]", help="owner of DIR and the key: the uid the sidecar runs as")
    one.add_argument(
        "--host-key",
        metavar="FILE|KEY",
        help="the target's host public key (its /etc/ssh/ssh_host_ed25519_key.pub, or the text): writes known_hosts",
    )
    p.add_argument(
        "--rrsync-dir",
        default=DEFAULT_RRSYNC_DIR,
        help=f"the uploads directory on the target, the jail of rrsync -wo ({DEFAULT_RRSYNC_DIR})",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing on stdout (what was made still goes to stderr)")
    return p


def _fail(code: int, message: str) -> int:
    print(f"upsync: {message}", file=sys.stderr)
    return code


def _note(message: str) -> None:
    print(f"upsync keys: {message}", file=sys.stderr)


def _owner(value: str | None, flag: str) -> Owner | None:
    return None if value is None else parse_owner(value, flag)


def _host_key(value: str) -> str:
    if value.lstrip().startswith(tuple(_KEY_TYPES)):
        return public_key(value, f'--host-key="{value[:40]}"')
    try:
        text = Path(value).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise KeysError(
            f'invalid --host-key="{value}": must be the target\'s host public key or a file holding it ({exc.strerror})'
        ) from None
    return public_key(text, f'--host-key="{value}" (its content)')


def _topology(args: argparse.Namespace, writer: Writer, shown: str) -> list[str]:
    topo = Topology(
        sidecar_owner=_owner(args.sidecar_owner, "--sidecar-owner"),
        fanout_owner=_owner(args.fanout_owner, "--fanout-owner"),
        node_owner=_owner(args.node_owner, "--node-owner"),
        content_names=known_hosts_names(args.content_targets, "--content-targets"),
        web_names=known_hosts_names(args.web_targets, "--web-targets"),
        rrsync_dir=check_rrsync_dir(args.rrsync_dir),
    )
    name = check_name(args.name, "--name")
    namespace = check_name(args.namespace, "--namespace")
    writer.mkdir(".")
    for consumer in (*CLIENTS, *NODES):
        writer.mkdir(consumer)
    pubs: dict[str, str] = {}
    made: list[str] = []
    for spec in topology_keys(topo):
        pubs[spec.rel], new = writer.keypair(spec)
        _note(f"{'made' if new else 'kept'} {shown}/{spec.rel} ({fingerprint(pubs[spec.rel])})")
        made += [spec.rel] if new else []
    for spec in topology_files(topo, pubs):
        writer.apply(spec)
    _note(
        f"ready: sidecar -> {','.join(topo.content_names)}, fanout -> {','.join(topo.web_names)} "
        f"(rrsync -wo {topo.rrsync_dir}); {len(made)} new key(s)"
    )
    return [
        f"# Keys in {shown}: sidecar/, fanout/ (clients), content/, web/ (nodes). To load them:",
        "# Docker Swarm secrets (the names deploy/swarm/stack.yml expects; UPSYNC_SECRETS=" + name + "):",
        *swarm_commands(shown, name),
        "# Kubernetes Secrets (the names deploy/kubernetes/ expects):",
        *kubernetes_commands(shown, name, namespace),
    ]


def _client(args: argparse.Namespace, writer: Writer, shown: str) -> list[str]:
    names = known_hosts_names(args.targets, "--targets")
    owner = _owner(args.owner, "--owner")
    rrsync_dir = check_rrsync_dir(args.rrsync_dir)
    host_pub = _host_key(args.host_key) if args.host_key is not None else None
    writer.mkdir(".")
    pub, new = writer.keypair(KeySpec(KEY_NAME, "upsync-sidecar", owner))
    owned = f", owner {owner}" if owner else ""
    _note(f"{'made' if new else 'kept'} {shown}/{KEY_NAME} ({fingerprint(pub)}){owned}")
    known = known_hosts_line(names, host_pub) if host_pub else None
    for spec in client_files(owner, known):
        writer.apply(spec)
    hosts = ", ".join(sorted({t.host for t in parse_targets(args.targets)}))
    lines = [
        f"# On {hosts}: the target account's authorized_keys line (write-only rsync into {rrsync_dir}, nothing else):",
        authorized_keys_line(pub, rrsync_dir, "upsync-sidecar").rstrip("\n"),
    ]
    if known:
        lines += [f"# Pinned in {shown}/known_hosts (SYNC_SSH_KNOWN_HOSTS_FILE):", known.rstrip("\n")]
    else:
        lines += [
            f"# The known_hosts line for {shown}/known_hosts (SYNC_SSH_KNOWN_HOSTS_FILE): run this on the target"
            " and append its output (or run this command again with --host-key):",
            f"echo \"{','.join(names)} $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)\"",
        ]
    lines.append(f"# The sidecar: SYNC_TARGETS={args.targets} SYNC_SSH_KEY_FILE={shown}/{KEY_NAME}")
    return lines


def main(argv: Sequence[str]) -> int:
    """``python -m sidecar keys ...``; returns the exit code."""
    try:
        args = _parser().parse_args(list(argv))
    except _UsageError as exc:
        return _fail(EXIT_CONFIG, f"invalid command line: {exc} (python -m sidecar keys --help)")
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is None:
        return _fail(
            EXIT_ENVIRONMENT, "ssh-keygen is not installed or not on PATH (install the openssh-client package)"
        )
    shown = args.dir.rstrip("/") or "/"
    try:
        _check_modes(args)
        writer = Writer(Path(args.dir), ssh_keygen)
        old = os.umask(0o077)
        try:
            lines = _client(args, writer, shown) if args.targets is not None else _topology(args, writer, shown)
        finally:
            os.umask(old)
    except KeysError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    except KeysFailure as exc:
        return _fail(EXIT_FAILED, str(exc))
    if not args.quiet:
        print("\n".join(lines))
    return 0


_TOPOLOGY_FLAGS = {
    "sidecar_owner": "--sidecar-owner",
    "fanout_owner": "--fanout-owner",
    "node_owner": "--node-owner",
}
_CLIENT_FLAGS = {"owner": "--owner", "host_key": "--host-key"}


def _check_modes(args: argparse.Namespace) -> None:
    """The two uses take different flags; a flag of the other use is a mistake worth naming."""
    if args.targets is not None:
        wrong = _given(args, _TOPOLOGY_FLAGS) + [
            flag
            for attr, flag, default in (
                ("content_targets", "--content-targets", DEFAULT_CONTENT_TARGETS),
                ("web_targets", "--web-targets", DEFAULT_WEB_TARGETS),
            )
            if getattr(args, attr) != default
        ]
        if wrong:
            raise KeysError(f"invalid {wrong[0]}: must not be given with --targets (it is for the whole topology)")
    else:
        wrong = _given(args, _CLIENT_FLAGS)
        if wrong:
            raise KeysError(f"invalid {wrong[0]}: must be given with --targets (one client key for existing targets)")


def _given(args: argparse.Namespace, flags: Mapping[str, str]) -> list[str]:
    return [flag for attr, flag in flags.items() if getattr(args, attr) is not None]
