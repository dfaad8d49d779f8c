"""Unit tests: SYNC_TARGETS parsing."""

from __future__ import annotations

import pytest

from sidecar.targets import Target, TargetError, parse_target, parse_targets


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ssh://upsync@content/", Target("upsync", "content", 22, "/")),
        ("ssh://u@h:2222/srv/uploads/", Target("u", "h", 2222, "/srv/uploads")),
        ("ssh://u@[::1]:2200/x", Target("u", "::1", 2200, "/x")),
        ("u@h:/srv/x", Target("u", "h", 22, "/srv/x")),
        ("u@[fe80::1]:/x", Target("u", "fe80::1", 22, "/x")),
        ("dns+ssh://upsync@web/", Target("upsync", "web", 22, "/", resolve_all=True)),
        ("  ssh://u@10.0.0.5/a  ", Target("u", "10.0.0.5", 22, "/a")),
    ],
)
def test_valid_forms(spec: str, expected: Target) -> None:
    assert parse_target(spec) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("ssh://h/x", "must name the login user"),
        ("u@h:relative/path", "must use an absolute path"),
        ("u@h:", "must use an absolute path"),
        ("ssh://u@h", "must give a path"),
        ("ssh://u@h:0/x", "port from 1 to 65535"),
        ("ssh://u@h:abc/x", "port from 1 to 65535"),
        ("ssh://u@h:/x", "must give a port"),
        ("ftp://u@h/x", "known scheme"),
        ("ssh://u@h/a/../b", '".."'),
        ("ssh://-oProxyCommand=x@h/x", "valid user name"),
        ("ssh://u@-oProxyCommand=x/x", "valid host name"),
        ("ssh://u@[::1/x", "close the ["),
        ("justahost", "must be"),
    ],
)
def test_invalid_forms_say_what_to_fix(spec: str, needle: str) -> None:
    with pytest.raises(TargetError, match="^must") as exc:
        parse_target(spec)
    assert needle in str(exc.value)


def test_list_and_duplicates() -> None:
    assert len(parse_targets("ssh://a@h/x, ssh://a@h/y")) == 2
    with pytest.raises(TargetError, match="twice"):
        parse_targets("u@h:/a,ssh://u@h:22/a/")
    with pytest.raises(TargetError, match="at least one"):
        parse_targets(" , ")


def test_names_and_destinations() -> None:
    t = parse_target("ssh://u@[::1]:2200/srv")
    assert t.name == "ssh://u@[::1]:2200/srv"
    assert t.rsync_dest() == "u@[::1]:/srv/"
    assert t.known_hosts_name == "[::1]:2200"
    web = parse_target("dns+ssh://upsync@web/").expand("172.18.0.5")
    assert web.host == "172.18.0.5" and web.host_key_alias == "web" and not web.resolve_all
    assert web.known_hosts_name == "web"
    assert web.name == "ssh://upsync@172.18.0.5:22/"
