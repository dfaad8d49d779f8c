"""Post-sync hooks against a real sshd: the command gets every name intact and no secret, a hanging hook is
killed at its timeout while replication goes on, the webhook is signed, retried and capped."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.hooks import Changes, CommandHook, Hooks, Notice, Webhook, run_bounded
from tests.helpers import assert_converges, wait_until
from tests.sshd import SshServer

# A hook that records what it got: its stdin and environment, one JSON file per run.
RECORDER = r"""
import json, os, sys, time
out = sys.argv[1]
data = sys.stdin.buffer.read()
records = [r.decode("utf-8", "surrogateescape") for r in data.split(b"\0")[:-1]]
doc = {"records": records, "env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}
name = os.path.join(out, f"run-{time.time_ns()}.json")
with open(name + ".tmp", "w") as fh:
    json.dump(doc, fh, ensure_ascii=True)
os.rename(name + ".tmp", name)
"""

# Names a web app may well write (a plugin's upload, a user's file name), and rsync has to escape.
NAMES = ["new\nline.jpg", "café ✓/photo 1.jpg", "tab\there.jpg", "back\\#012slash.jpg", "quote\"'.jpg"]


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("run-*.json"))]


def _paths(runs: list[dict], what: str) -> set[str]:
    return {r[len(what) + 1 :] for run in runs for r in run["records"] if r.startswith(what + " ")}


@pytest.fixture
def recorder(workdir: Path) -> tuple[Path, str]:
    out = workdir / "hook-runs"
    out.mkdir()
    script = workdir / "recorder.py"
    script.write_text(RECORDER)
    return out, f"{sys.executable} {script} {out}"


@pytest.mark.integration
def test_hook_gets_every_name_intact_and_no_secret(
    source: Path, sshd: SshServer, run_sidecar, recorder: tuple[Path, str]
) -> None:
    out, command = recorder
    # The daemon's environment holds a token meant for the hook and one that is not.
    sidecar = run_sidecar(
        SYNC_HOOK_COMMAND=command, SYNC_HOOK_ENV="CDN_TOKEN,UNSET_NAME", CDN_TOKEN="for-the-hook", DB_PASSWORD="no"
    )
    # The first full sync sent the seed file: one run, kind full.
    first = wait_until(lambda: _runs(out), 10, "the full sync's hook run")
    assert first[0]["env"]["UPSYNC_KIND"] == "full"
    assert first[0]["records"] == ["sent seed.txt"]

    (source / "café ✓").mkdir()
    for name in NAMES:
        (source / name).write_bytes(b"x" * 10)
    assert_converges(source, sshd.root, 10)
    wait_until(lambda: set(NAMES) <= _paths(_runs(out), "sent"), 10, "every name to reach the hook")
    (source / "seed.txt").unlink()
    wait_until(lambda: "seed.txt" in _paths(_runs(out), "deleted"), 10, "the delete to reach the hook")

    runs = _runs(out)
    for run in runs:
        env = run["env"]
        leaked = sorted(k for k in env if k.startswith("SYNC_") or k == "DB_PASSWORD")
        assert not leaked, f"the hook saw {leaked}"
        assert set(env) <= {"PATH", "LC_CTYPE", "CDN_TOKEN"} | {k for k in env if k.startswith("UPSYNC_")}, sorted(env)
        assert env["CDN_TOKEN"] == "for-the-hook"
        assert env["UPSYNC_TARGET"] == sshd.url
        assert env["UPSYNC_TARGET_HOST"] == "127.0.0.1"
        assert env["UPSYNC_SOURCE"] == str(source)
        assert run["cwd"] == str(source)
        assert env["UPSYNC_ALL"] == "0"
        listed = [r for r in run["records"] if r.startswith(("sent ", "deleted "))]
        assert len(listed) == len(run["records"]), run["records"]
        assert int(env["UPSYNC_SENT"]) == sum(r.startswith("sent ") for r in run["records"])
    # The runner counts a run once the hook has exited (after it wrote its file).
    wait_until(lambda: sidecar.metric("upsync_hook_runs_total", hook="command", result="ok") == len(runs), 5, "count")
    assert sidecar.metric("upsync_hook_runs_total", result="failed") == 0


@pytest.mark.integration
def test_hanging_hook_is_killed_at_its_timeout_and_replication_goes_on(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path
) -> None:
    token = f"hang-{secrets.token_hex(4)}"
    ran = workdir / "ran"
    # Each run notes its paths, then hangs (with a child of its own): killed as a group at 2 s.
    script = f'cat >> {ran}; printf "\\n--\\n" >> {ran}; sleep 600 & sleep 600; :'
    sidecar = run_sidecar(SYNC_HOOK_COMMAND=f"sh -c '{script}' {token}", SYNC_HOOK_TIMEOUT_S="2")

    def hung() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline:
                found.append(int(pid))
        return found

    wait_until(hung, 10, "the hook to hang")
    # While it hangs, replication goes on: every batch lands at once.
    for i in range(5):
        (source / f"during-{i}.jpg").write_bytes(os.urandom(1000))
        assert_converges(source, sshd.root, 5)
    assert hung(), "the hook ended before its timeout"
    wait_until(lambda: sidecar.metric("upsync_hook_runs_total", result="timeout") >= 1, 10, "the kill")
    # The syncs made meanwhile waited as one run (merged), which then reported every one of them.
    wait_until(lambda: all(f"during-{i}.jpg" in ran.read_text() for i in range(5)), 10, "the merged run")
    assert sidecar.metric("upsync_hook_merged_total") >= 1
    wait_until(lambda: sidecar.metric("upsync_hook_runs_total", result="timeout") >= 2, 10, "the second kill")
    sidecar.stop()
    wait_until(lambda: not hung(), 5, "nothing of the hook left running")
    logs = sidecar.logs()
    assert "hook killed at SYNC_HOOK_TIMEOUT_S" in logs
    assert "Traceback" not in logs


# ----- the webhook -----------------------------------------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append((self.path, dict(self.headers), body))
        status = self.server.answers.pop(0) if self.server.answers else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    got: list[tuple[str, dict[str, str], bytes]]
    answers: list[int]


@pytest.fixture
def receiver() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Receiver)
    server.got, server.answers = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_webhook_is_signed_retried_and_capped(
    source: Path, sshd: SshServer, run_sidecar, workdir: Path, receiver: _Server
) -> None:
    secret = secrets.token_hex(16)
    (workdir / "secret").write_text(secret + "\n")
    path_token = secrets.token_hex(8)  # a token in the URL (Slack style): never logged
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks/{path_token}"
    receiver.answers = [503]  # the first delivery fails once
    sidecar = run_sidecar(
        SYNC_WEBHOOK_URL=url,
        SYNC_WEBHOOK_SECRET_FILE=str(workdir / "secret"),
        SYNC_WEBHOOK_MAX_BYTES="2048",
    )
    wait_until(lambda: len(receiver.got) >= 2, 15, "the retried first delivery")
    (first_path, first_headers, first_body), (_, again_headers, again_body) = receiver.got[:2]
    assert first_path == f"/hooks/{path_token}"
    assert first_headers["X-Upsync-Delivery"] == again_headers["X-Upsync-Delivery"]  # one delivery, retried
    assert first_body == again_body
    for _, headers, body in receiver.got[:2]:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Upsync-Signature"], expected)
        assert headers["Content-Type"] == "application/json"
    doc = json.loads(first_body)
    assert (doc["event"], doc["kind"], doc["sent"], doc["all"]) == ("synced", "full", ["seed.txt"], False)

    (source / "café ✓").mkdir()
    for name in NAMES:
        (source / name).write_bytes(b"y")
    assert_converges(source, sshd.root, 10)

    def sent() -> set[str]:
        return {p for _, _, body in receiver.got for p in json.loads(body)["sent"]}

    wait_until(lambda: set(NAMES) <= sent(), 10, "every name in a webhook")
    # Past SYNC_WEBHOOK_MAX_BYTES: no list, "all".
    many = source / ("x" * 100)
    many.mkdir()
    for i in range(40):
        (many / f"{i:03d}-{'y' * 100}.jpg").write_bytes(b"z")
    assert_converges(source, sshd.root, 10)

    def capped() -> list[dict]:
        docs = [json.loads(body) for _, _, body in receiver.got]
        return [d for d in docs if d["all"]]

    doc = wait_until(capped, 10, "a capped delivery")[0]  # type: ignore[index]
    assert doc["sent"] == [] and doc["deleted"] == [] and doc["sent_count"] >= 1
    assert all(len(body) <= 2048 for _, _, body in receiver.got)
    assert sidecar.metric("upsync_hook_everything_total", hook="webhook") >= 1
    assert sidecar.metric("upsync_hook_runs_total", hook="webhook", result="ok") >= 3
    logs = sidecar.logs()
    assert "webhook failed; retrying" in logs
    assert secret not in logs and path_token not in logs


# ----- unit: the runner and the command's bounds ---------------------------------------------------------


def test_run_bounded_kills_the_group_and_keeps_the_tail() -> None:
    ran = run_bounded(["sh", "-c", "echo start; sleep 30 & sleep 30"], b"", {"PATH": "/usr/bin:/bin"}, None, 0.5)
    assert ran.returncode is None and ran.output.strip() == b"start" and ran.seconds < 5
    ran = run_bounded(["sh", "-c", "exit 3"], b"x" * 1_000_000, {"PATH": "/usr/bin:/bin"}, None, 5)
    assert ran.returncode == 3  # did not read its (large) stdin: no deadlock, no error
    ran = run_bounded(["/nonexistent/hook"], b"", {}, None, 5)
    assert ran.returncode is None and "cannot run" in ran.error


def test_command_hook_stdin_and_environment() -> None:
    changes = Changes(limit=10)
    for name in NAMES:
        changes.add("sent", name)
    changes.add("deleted", "gone/")
    hook = CommandHook(["true"], 5, [], "/srv", {"PATH": "/bin", "SYNC_SSH_KEY_FILE": "/k", "AWS_SECRET": "s"})
    notice = Notice("ssh://u@h:22/", "h", ["batch"], changes)
    records = hook.stdin(notice).split(b"\0")
    assert records[-1] == b"" and records[:-1] == [f"sent {n}".encode() for n in NAMES] + [b"deleted gone/"]
    env = hook.environment(notice)
    assert {k for k in env if not k.startswith("UPSYNC_")} == {"PATH"}
    assert (env["UPSYNC_SENT"], env["UPSYNC_DELETED"], env["UPSYNC_ALL"]) == ("5", "1", "0")


class _Gate:
    """A sink whose runs block until released; records what each run got."""

    name = "command"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.got: list[Notice] = []
        self.stopped = False

    def deliver(self, notice: Notice) -> str:
        self.got.append(notice)
        self.started.set()
        self.release.wait(10)
        return "ok"

    def stop(self) -> None:
        self.stopped = True


def _changes(limit: int, *sent: str) -> Changes:
    c = Changes(limit)
    for path in sent:
        c.add("sent", path)
    return c


def test_syncs_arriving_while_a_hook_runs_merge_into_one_waiting_run() -> None:
    sink = _Gate()
    hooks = Hooks([sink], max_paths=3)
    hooks.submit("t1", "h1", "full", _changes(3, "a"))
    assert sink.started.wait(5)
    for kind, path in (("batch", "b"), ("batch", "c"), ("full", "d")):  # t1 is busy: these wait, merged
        hooks.submit("t1", "h1", kind, _changes(3, path))
    hooks.submit("t2", "h2", "batch", _changes(3, "x"))  # another target does not wait for t1
    wait_until(lambda: len(sink.got) == 2, 5, "t2's run")
    assert sink.got[1].target == "t2"
    hooks.submit("t1", "h1", "batch", Changes(3))  # nothing changed: no run, no merge
    sink.release.set()
    wait_until(hooks.idle, 5, "the runs to end")
    first, _, merged = sink.got
    assert (first.kind, first.changes.sent) == ("full", ["a"])
    # b, c, d: 3 paths, the limit; the 4th would have made it "all".
    assert (merged.kind, merged.syncs, merged.changes.sent, merged.changes.everything) == (
        "mixed",
        3,
        ["b", "c", "d"],
        False,
    )
    hooks.submit("t1", "h1", "batch", _changes(3, "e", "f", "g"))
    hooks.close(time.monotonic() + 5)
    assert sink.got[-1].changes.sent == ["e", "f", "g"] and sink.stopped


def test_merged_runs_past_the_limit_say_all() -> None:
    sink = _Gate()
    hooks = Hooks([sink], max_paths=3)
    hooks.submit("t", "h", "batch", _changes(3, "busy"))
    assert sink.started.wait(5)
    hooks.submit("t", "h", "batch", _changes(3, "a", "b"))
    hooks.submit("t", "h", "batch", _changes(3, "c", "d"))
    sink.release.set()
    hooks.close(time.monotonic() + 5)
    last = sink.got[-1].changes
    assert (last.everything, last.sent, last.sent_count) == (True, [], 4)


def test_webhook_does_not_retry_a_refusal_or_follow_a_redirect(receiver: _Server) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    hook = Webhook(url, None, 5, 10000, "/srv", wait=lambda _: 0)
    notice = Notice("t", "h", ["batch"], _changes(10, "a.jpg"))
    for status in (400, 302):
        receiver.answers = [status]
        before = len(receiver.got)
        assert hook.deliver(notice) == "failed"
        assert len(receiver.got) == before + 1  # one attempt, no retry, nothing sent elsewhere
    receiver.answers = [500, 502]
    assert hook.deliver(notice) == "ok" and len(receiver.got) == 5  # two retries, then 200
