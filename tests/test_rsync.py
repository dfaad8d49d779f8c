"""Unit tests: rsync exit classification, --stats parsing, command lines."""

from __future__ import annotations

import pytest

from sidecar.rsync import Rsync, classify, parse_skipped_deletes, parse_stats


@pytest.mark.parametrize(
    ("code", "stderr", "kind", "reason"),
    [
        (0, "", "ok", ""),
        (24, 'file has vanished: "/src/x"', "vanished", ""),
        (
            23,
            'rsync: [sender] send_files failed to open "/s/secret": Permission denied (13)\n'
            "rsync error: some files/attrs were not transferred (see previous errors) (code 23)",
            "skipped",
            "",
        ),
        (23, 'rsync: [receiver] mkstemp "/t/.x.AbC" failed: Permission denied (13)', "retry", "partial"),
        (11, 'rsync: [receiver] write failed on "/t/x": No space left on device (28)', "retry", "disk_full"),
        (23, "rsync: write failed: No space left on device (28)", "retry", "disk_full"),
        (25, "Deletions stopped due to --max-delete limit (3 skipped)", "delete_limit", "delete_guard"),
        (12, "/usr/bin/rrsync error: Another instance of rrsync is already accessing this directory.", "retry", "busy"),
        (12, "/usr/bin/rrsync error: option --inplace has been disabled on this server.", "fatal", "rejected"),
        (12, "/usr/bin/rrsync error: Restricted directory does not exist!", "fatal", "target_path"),
        (
            12,
            'Traceback (most recent call last):\n  File "/usr/bin/rrsync", line 1005, in <module>\n'
            "    lock_or_die(args.dir)\nFileNotFoundError: [Errno 2] No such file or directory: '/srv/x'\n"
            "rsync: connection unexpectedly closed (0 bytes received so far) [sender]",
            "fatal",
            "target_path",
        ),
        (255, "Host key verification failed.", "retry", "host_key"),
        (255, "u@h: Permission denied (publickey).", "retry", "auth"),
        (255, "ssh: connect to host 127.0.0.1 port 1: Connection refused", "retry", "network"),
        (12, "rsync: connection unexpectedly closed (0 bytes received so far) [sender]", "retry", "network"),
        (30, "rsync error: timeout in data send/receive (code 30)", "retry", "timeout"),
        (1, "rsync: --bogus: unknown option", "fatal", "usage"),
        (2, "protocol version mismatch", "fatal", "usage"),
        (3, 'rsync: change_dir#3 "/nope" failed: No such file or directory (2)', "retry", "target_path"),
        (99, "", "retry", "error"),
    ],
)
def test_classify(code: int, stderr: str, kind: str, reason: str) -> None:
    outcome = classify(code, stderr)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    assert "\n" not in outcome.message


def test_stats() -> None:
    out = (
        "Number of files: 6 (reg: 4, dir: 2)\nNumber of deleted files: 3 (reg: 2, dir: 1)\n"
        "Number of regular files transferred: 10,001\nTotal transferred file size: 163,856,384 bytes\n"
    )
    s = parse_stats(out)
    assert (s.files, s.bytes, s.deleted) == (10001, 163856384, 3)
    assert parse_stats("") == parse_stats("garbage")
    assert parse_skipped_deletes("Deletions stopped due to --max-delete limit (1,234 skipped)") == 1234
    assert parse_skipped_deletes("nothing") is None


def test_command_lines_never_use_inplace_or_remote_shell() -> None:
    r = Rsync("/src", "u@h:/x/", "ssh -F cfg", "D755,F644", ("*.tmp",), 60)
    batch = r.batch_args(delete=True, max_delete=100)
    assert batch[-2:] == ["/src/", "u@h:/x/"]
    for opt in (
        "--from0",
        "--files-from=-",
        "--delete-missing-args",
        "--force",
        "--max-delete=100",
        "--safe-links",
        "--chmod=D755,F644",
        "--exclude=*.tmp",
        "--timeout=60",
    ):
        assert opt in batch
    assert "--recursive" not in batch  # a batch never walks a tree
    assert "--ignore-missing-args" in r.batch_args(delete=False, max_delete=1)
    full = r.full_args(delete=True, max_delete=0)
    assert "--recursive" in full and "--delete" in full and "--max-delete=0" in full
    for args in (batch, full):
        assert not any(a.startswith(("--inplace", "--partial", "--append")) for a in args)
