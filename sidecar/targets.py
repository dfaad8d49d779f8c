"""Parse ``SYNC_TARGETS`` entries into :class:`Target` values.

Three forms are accepted (comma-separated in ``SYNC_TARGETS``)::

    ssh://user@host[:port]/abs/path      one target
    user@host:/abs/path                  rsync's own form, port 22
    dns+ssh://user@name[:port]/abs/path  every address ``name`` resolves to, re-resolved periodically;
                                         host keys are checked against ``name`` (HostKeyAlias)

The path is absolute. Against an account jailed with ``rrsync``, the path is read inside the jail:
``/`` is the jail's root.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

__all__ = ["Target", "TargetError", "parse_target", "parse_targets"]

_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_URL_RE = re.compile(r"^(?P<scheme>ssh|dns\+ssh)://(?P<rest>.*)$")
FORMS = "ssh://user@host[:port]/abs/path, user@host:/abs/path or dns+ssh://user@name[:port]/abs/path"


class TargetError(ValueError):
    """A target entry that cannot be used; the message is a "must ..." phrase saying what to fix."""


@dataclass(frozen=True)
class Target:
    """One place to replicate to.

    Args:
        user: ssh login name.
        host: host name or IP address (IPv6 without brackets).
        port: ssh port.
        path: absolute directory on the target (inside the rrsync jail, if any).
        resolve_all: ``dns+ssh://`` form: stands for every address ``host`` resolves to.
        host_key_alias: name host keys are looked up under (set for addresses expanded from a name).
    """

    user: str
    host: str
    port: int
    path: str
    resolve_all: bool = False
    host_key_alias: str | None = None

    @property
    def host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def name(self) -> str:
        """Stable display name, used in logs and as the ``target`` metrics label."""
        scheme = "dns+ssh" if self.resolve_all else "ssh"
        return f"{scheme}://{self.user}@{self.host_for_url}:{self.port}{self.path}"

    @property
    def known_hosts_name(self) -> str:
        """How this host appears in a known_hosts file: ``[host]:port`` off port 22; an alias as is
        (ssh looks a ``HostKeyAlias`` up without the port)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def rsync_dest(self) -> str:
        """Destination argument for rsync; the trailing slash makes it "into this directory"."""
        path = self.path if self.path.endswith("/") else self.path + "/"
        return f"{self.user}@{self.host_for_url}:{path}"

    def expand(self, address: str) -> Target:
        """The concrete target for one resolved address of a ``dns+ssh://`` target."""
        return replace(self, host=address, resolve_all=False, host_key_alias=self.host)


def _check_path(spec: str, path: str) -> str:
    if not path.startswith("/"):
        raise TargetError(
            f'must use an absolute path in "{spec}" (with an rrsync-jailed account, / is the jail\'s root)'
        )
    if "\n" in path or "\0" in path or any(part == ".." for part in path.split("/")):
        raise TargetError(f'must not have "..", newlines or NUL in the path of "{spec}"')
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return path


def _check_user_host(spec: str, user: str, host: str) -> None:
    if not user:
        raise TargetError(f'must name the login user in "{spec}" ({FORMS})')
    if not _USER_RE.match(user):
        raise TargetError(f'must have a valid user name in "{spec}" ("{user}" is not one)')
    if not host:
        raise TargetError(f'must name a host in "{spec}" ({FORMS})')
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOST_RE.match(host) or ".." in host:
        raise TargetError(f'must have a valid host name or address in "{spec}" ("{host}" is not one)')


def _parse_url(spec: str, scheme: str, rest: str) -> Target:
    authority, slash, path = rest.partition("/")
    if not slash:
        raise TargetError(f'must give a path in "{spec}" ({FORMS})')
    user, at, hostport = authority.rpartition("@")
    if not at:
        raise TargetError(f'must name the login user in "{spec}" ({FORMS})')
    port = 22
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket:
            raise TargetError(f'must close the [ of the host in "{spec}"')
        if tail:
            if not tail.startswith(":"):
                raise TargetError(f'must have :port after ] in "{spec}"')
            port_text = tail[1:]
        else:
            port_text = ""
    else:
        host, colon, port_text = hostport.partition(":")
        if colon and not port_text:
            raise TargetError(f'must give a port after : in "{spec}"')
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise TargetError(f'must have a port from 1 to 65535 in "{spec}" ("{port_text}" is not one)')
        port = int(port_text)
    _check_user_host(spec, user, host)
    return Target(user, host, port, _check_path(spec, "/" + path), resolve_all=scheme == "dns+ssh")


def parse_target(spec: str) -> Target:
    """Parse one target.

    Example:
        >>> parse_target("ssh://upsync@content:2222/srv/uploads").rsync_dest()
        'upsync@content:/srv/uploads/'
    """
    spec = spec.strip()
    match = _URL_RE.match(spec)
    if match:
        return _parse_url(spec, match["scheme"], match["rest"])
    if "://" in spec:
        raise TargetError(f'must use a known scheme in "{spec}" ({FORMS})')
    userhost, colon, path = spec.partition(":")
    if userhost.startswith("[") or not colon:
        # user@[v6]:/path
        m = re.match(r"^(?P<user>[^@]*)@\[(?P<host>[^\]]+)\]:(?P<path>.*)$", spec)
        if not m:
            raise TargetError(f'must be {FORMS}, not "{spec}"')
        user, host, path = m["user"], m["host"], m["path"]
    else:
        user, at, host = userhost.rpartition("@")
        if not at:
            raise TargetError(f'must name the login user in "{spec}" ({FORMS})')
        if host.startswith("["):
            m = re.match(r"^(?P<user>[^@]*)@\[(?P<host>[^\]]+)\]:(?P<path>.*)$", spec)
            if not m:
                raise TargetError(f'must be {FORMS}, not "{spec}"')
            user, host, path = m["user"], m["host"], m["path"]
    _check_user_host(spec, user, host)
    return Target(user, host, 22, _check_path(spec, path))


def parse_targets(text: str) -> tuple[Target, ...]:
    """Parse a comma-separated ``SYNC_TARGETS`` value; duplicates are an error.

    Example:
        >>> [t.name for t in parse_targets("ssh://a@h1/x, b@h2:/y")]
        ['ssh://a@h1:22/x', 'ssh://b@h2:22/y']
    """
    if any(not c.isprintable() for c in text):
        raise TargetError("must not contain newlines or other control characters")
    entries = [part.strip() for part in text.split(",") if part.strip()]
    if not entries:
        raise TargetError(f"must list at least one target: {FORMS}")
    targets = tuple(parse_target(entry) for entry in entries)
    seen: dict[str, str] = {}
    for entry, target in zip(entries, targets, strict=True):
        if target.name in seen:
            raise TargetError(f'must not list one target twice ("{entry}" repeats "{seen[target.name]}")')
        seen[target.name] = entry
    return targets
