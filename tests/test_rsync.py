"""Unit tests: rsync exit classification, --stats parsing, command lines."""

from __future__ import annotations

import time

import pytest

from sidecar.filters import Excludes
from sidecar.rsync import MISSING_ARGS, RULES, Rsync, classify, parse_stats, receiver_version


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
        (  # a send (--max-delete=0, no --force): a directory on the target where a file goes now
            23,
            "cannot delete non-empty directory: 2019\ncould not make way for new regular file: 2019\n"
            "rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394)",
            "delete_limit",
            "delete_guard",
        ),
        (
            23,
            "could not make way for new regular file: 2019\nDeletions stopped due to --max-delete limit (3 skipped)\n"
            "rsync error: some files/attrs were not transferred (see previous errors) (code 23)",
            "delete_limit",
            "delete_guard",
        ),
        (  # in the way, and a real receiver error too: retried like any partial transfer
            23,
            "could not make way for new symlink: x\n"
            'rsync: [receiver] mkstemp "/t/.y.AbC" failed: Permission denied (13)',
            "retry",
            "partial",
        ),
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
        (
            2,
            "invalid file mode 00 for 2026/12/b.txt [Receiver]\n"
            "rsync error: protocol incompatibility (code 2) at flist.c(874) [Receiver=3.2.7]",
            "fatal",
            "protocol",
        ),
        (2, "protocol version mismatch", "fatal", "usage"),
        (3, 'rsync: change_dir#3 "/nope" failed: No such file or directory (2)', "retry", "target_path"),
        (99, "", "retry", "error"),
        (126, "upsync-landlock: landlock_restrict_self: Bad file descriptor", "fatal", "sandbox"),
        (127, "upsync-landlock: cannot run rsync: No such file or directory", "fatal", "sandbox"),
        (126, "", "retry", "error"),
    ],
)
def test_classify(code: int, stderr: str, kind: str, reason: str) -> None:
    from sidecar.metrics import REASONS

    outcome = classify(code, stderr)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    assert outcome.reason in (*REASONS, "")  # the fixed set of the reason label (and of Metrics.forget)
    assert "\n" not in outcome.message


def test_stats() -> None:
    out = (
        "Number of files: 6 (reg: 4, dir: 2)\nNumber of created files: 2 (reg: 2)\n"
        "Number of deleted files: 3 (reg: 2, dir: 1)\n"
        "Number of regular files transferred: 10,001\nTotal transferred file size: 163,856,384 bytes\n"
    )
    s = parse_stats(out)
    assert (s.files, s.bytes, s.deleted, s.created, s.total) == (10001, 163856384, 3, 2, 6)
    assert parse_stats("") == parse_stats("garbage")
    assert receiver_version("... at main.c(1338) [Receiver=3.5.0]") == "3.5.0"
    assert receiver_version("rsync error: ... [sender=3.5.0]") == ""  # our own side: not the receiver


def test_command_lines_never_use_inplace_or_remote_shell() -> None:
    r = Rsync("/src", "u@h:/x/", "ssh -F cfg", "D755,F644", Excludes(["*.tmp", "/cache/"]), 60)
    send = r.send_args()
    assert send[-2:] == ["/src/", "u@h:/x/"]
    for opt in ("--from0", "--files-from=-", "--ignore-missing-args", "--safe-links", "--chmod=D755,F644"):
        assert opt in send
    # Each exclude and its /** twin: a listed path below an excluded directory is excluded too.
    assert {"--exclude=*.tmp", "--exclude=*.tmp/**", "--exclude=/cache/", "--exclude=/cache/**"} <= set(send)
    assert "--recursive" not in send and "--delete" not in send  # a send never walks a tree, never deletes
    missing = r.remove_args(MISSING_ARGS, count_only=False, max_delete=7)
    assert {"--files-from=-", "--delete-missing-args", "--force", "--max-delete=7"} <= set(missing)
    rules = r.remove_args(RULES, count_only=True)
    assert {"--recursive", "--delete", "--filter=merge -", "--dry-run"} <= set(rules)
    assert not any(a.startswith("--max-delete") for a in rules)  # a count deletes nothing anyway
    full = r.full_args(delete=True, count_only=False, max_delete=5)
    assert {"--recursive", "--delete", "--max-delete=5", "--filter=merge -"} <= set(full)
    assert "--dry-run" in r.full_args(delete=True, count_only=True)
    assert "--delete" not in r.full_args(delete=False, count_only=False)
    for args in (send, missing, rules, full, r.probe_args("/tmp/x")):
        assert not any(a.startswith(("--inplace", "--partial", "--append")) for a in args)
        assert "--timeout=60" in args


def test_a_run_past_its_slot_still_gets_all_its_input() -> None:
    # Regression: the slot was released through communicate(timeout=), after which communicate() never wrote
    # the rest of stdin: a list longer than the pipe buffer given to a slow rsync hung the worker for good.
    from sidecar.rsync import Slots

    slots = Slots(1, hold_s=0.05)
    r = Rsync("/src", "u@h:/x/", "ssh", "", Excludes(()), 60, slots=slots)
    data = b"x" * (1 << 20)
    result = r.run(["sh", "-c", "sleep 0.3; wc -c"], data)
    assert result.returncode == 0 and result.stdout.strip() == str(len(data))
    # ... and the slot was handed on while it waited: another run could start meanwhile.
    assert slots.acquire() is not None


def test_slots_bound_runs_at_once() -> None:
    import threading

    from sidecar.rsync import Slots

    slots = Slots(2, hold_s=10)
    first, second = slots.acquire(), slots.acquire()
    got = threading.Event()
    threading.Thread(target=lambda: (slots.acquire(), got.set()), daemon=True).start()
    assert not got.wait(0.2)  # a third waits ...
    first()
    first()  # (releasing twice is harmless)
    assert got.wait(5)  # ... until one is released
    second()


def test_one_reaper_hands_on_every_overdue_slot() -> None:
    # A run past hold_s gives its slot up without ending; one thread does that for every run (a timer thread
    # per run cost CPU and GIL hand-offs when many targets start at once).
    import threading

    from sidecar.rsync import Slots

    slots = Slots(2, hold_s=0.1)
    before = threading.active_count()
    releases = [slots.acquire() for _ in range(2)]  # held, never released: both become overdue
    t0 = time.monotonic()
    releases += [slots.acquire() for _ in range(2)]  # waits for the reaper
    assert time.monotonic() - t0 >= 0.09
    for release in releases:
        release()
    for _ in range(50):
        slots.acquire()()
    assert threading.active_count() <= before + 1  # the reaper, and no thread per run
