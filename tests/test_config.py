"""Unit tests: the settings table, precedence, validation messages, generated docs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sidecar.check import check_known_hosts, check_source, check_ssh_key
from sidecar.config import SETTINGS, ConfigError, load
from sidecar.docgen import env_example

BASE = {"SYNC_SOURCE": "/srv/uploads", "SYNC_TARGETS": "ssh://u@h/x", "SYNC_ENV_FILE": ""}
REPO = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    cfg, warnings = load(environ=BASE)
    assert warnings == []
    assert (cfg.quiet_ms, cfg.max_delay_ms, cfg.mode, cfg.delete, cfg.full_sync_interval) == (
        20,
        100,
        "watch",
        True,
        3600,
    )
    assert cfg.ssh_host_key_policy == "strict"
    assert cfg.http_addr == ("127.0.0.1", 9110)


def test_every_setting_has_flag_env_and_docs() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for s in SETTINGS:
        assert s.name.startswith("SYNC_") and s.flag.startswith("--") and s.help and s.form
        if s.default is not None:
            s.parse(s.default)  # every default is valid


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SYNC_QUIET_MS", "abc", 'invalid SYNC_QUIET_MS="abc": must be a whole number from 1 to 10000 (milliseconds)'),
        ("SYNC_QUIET_MS", "-5", 'invalid SYNC_QUIET_MS="-5": must be a whole number'),
        ("SYNC_MODE", "sometimes", 'invalid SYNC_MODE="sometimes": must be one of watch, interval, once'),
        ("SYNC_DELETE", "maybe", 'invalid SYNC_DELETE="maybe": must be true or false'),
        ("SYNC_HTTP_ADDR", "localhost", 'invalid SYNC_HTTP_ADDR="localhost": must be host:port'),
        ("SYNC_HTTP_ADDR", "127.0.0.1:70000", "must be host:port"),
        ("SYNC_CHMOD", "rwx", 'invalid SYNC_CHMOD="rwx": must be rsync --chmod rules'),
        ("SYNC_TARGETS", "ssh://h/x", 'invalid SYNC_TARGETS="ssh://h/x": must name the login user'),
        ("SYNC_SSH_HOST_KEY_POLICY", "no", "must be one of strict, accept-new"),
        ("SYNC_MAX_DELETE", "0", "must be a whole number from 1"),
        ("SYNC_LOG_FORMAT", "xml", "must be one of text, json"),
    ],
)
def test_invalid_values_one_line(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(environ={**BASE, name: value})
    text = str(exc.value)
    assert text.startswith(f"invalid {name}=") and message in text
    assert "\n" not in text


def test_required_settings() -> None:
    with pytest.raises(ConfigError, match=r"^invalid SYNC_SOURCE: must be set"):
        load(environ={"SYNC_TARGETS": "ssh://u@h/x", "SYNC_ENV_FILE": ""})
    with pytest.raises(ConfigError, match=r"^invalid SYNC_TARGETS: must be set"):
        load(environ={"SYNC_SOURCE": "/x", "SYNC_TARGETS": "  ", "SYNC_ENV_FILE": ""})


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="at least SYNC_QUIET_MS"):
        load(environ={**BASE, "SYNC_QUIET_MS": "100", "SYNC_MAX_DELAY_MS": "50"})
    with pytest.raises(ConfigError, match="when SYNC_MODE=interval"):
        load(environ={**BASE, "SYNC_MODE": "interval", "SYNC_FULL_SYNC_INTERVAL": "0"})


def test_unknown_names_warn_with_closest() -> None:
    _, warnings = load(environ={**BASE, "SYNC_QUIETMS": "5", "SYNC_ZZZ": "1", "OTHER": "x"})
    assert warnings == [
        "unknown setting SYNC_QUIETMS is ignored; did you mean SYNC_QUIET_MS?",
        "unknown setting SYNC_ZZZ is ignored",
    ]


def test_precedence_flag_env_dotenv_default(tmp_path: Path) -> None:
    env_file = tmp_path / "upsync.env"
    env_file.write_text("SYNC_QUIET_MS=30\nSYNC_MAX_DELAY_MS=900\nSYNC_RETRY_MAX_S=7\nSYNC_ZZZ=1\n")
    env = {"SYNC_SOURCE": "/x", "SYNC_TARGETS": "ssh://u@h/x", "SYNC_ENV_FILE": str(env_file), "SYNC_QUIET_MS": "40"}
    cfg, warnings = load({"SYNC_RETRY_MAX_S": "9"}, environ=env)
    assert cfg.quiet_ms == 40  # real env beats .env
    assert cfg.max_delay_ms == 900  # .env beats default
    assert cfg.retry_max_s == 9  # flag beats everything
    assert warnings == ["unknown setting SYNC_ZZZ is ignored"]


def test_env_file_named_but_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'^invalid SYNC_ENV_FILE=".*nope": must be an existing file'):
        load(environ={**BASE, "SYNC_ENV_FILE": str(tmp_path / "nope")})


def test_default_env_file_missing_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in BASE.items() if k != "SYNC_ENV_FILE"}
    load(environ=env)
    (tmp_path / ".env").write_text("SYNC_QUIET_MS=33\n")
    assert load(environ=env)[0].quiet_ms == 33


def test_file_checks(tmp_path: Path) -> None:
    key = tmp_path / "key"
    known = tmp_path / "known"
    cfg, _ = load(
        environ={
            **BASE,
            "SYNC_SOURCE": str(tmp_path / "src"),
            "SYNC_SSH_KEY_FILE": str(key),
            "SYNC_SSH_KNOWN_HOSTS_FILE": str(known),
        }
    )
    with pytest.raises(ConfigError, match="must be an existing directory"):
        check_source(cfg)
    (tmp_path / "src").write_text("a file")
    with pytest.raises(ConfigError, match="must be a directory, not a file"):
        check_source(cfg)
    with pytest.raises(ConfigError, match="must be an existing private key file"):
        check_ssh_key(cfg)
    key.write_text("ssh-ed25519 AAAA this is a public key\n")
    with pytest.raises(ConfigError, match="did you give the .pub file"):
        check_ssh_key(cfg)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    with pytest.raises(ConfigError, match="must be a private key ssh can load without a passphrase"):
        check_ssh_key(cfg)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "real")], check=True)
    key.write_bytes((tmp_path / "real").read_bytes())
    key.chmod(0o644)
    assert "too open" in check_ssh_key(cfg)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(tmp_path / "locked")], check=True)
    key.write_bytes((tmp_path / "locked").read_bytes())
    with pytest.raises(ConfigError, match="without a passphrase"):
        check_ssh_key(cfg)
    with pytest.raises(ConfigError, match="must be an existing known_hosts file"):
        check_known_hosts(cfg)
    known.write_text("# comment\nh ssh-ed25519 AAAA\n")
    assert "pins 1 host key" in check_known_hosts(cfg)


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_readme_table_is_generated() -> None:
    """The README's table is exactly `python -m sidecar config --markdown` (regenerate, don't hand-edit)."""
    from sidecar.docgen import markdown_table

    readme = (REPO / "README.md").read_text()
    block = _section(readme, "<!-- settings:start -->\n", "<!-- settings:end -->")
    assert block == markdown_table()


def test_env_example_is_generated() -> None:
    assert (REPO / ".env.example").read_text() == env_example()
    # and it is a valid .env: loading it gives the defaults
    names = re.findall(r"^(SYNC_[A-Z_]+)=", env_example(), flags=re.M)
    assert names == [s.name for s in SETTINGS]
