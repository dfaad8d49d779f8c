"""The compose topology end to end, through the real HTTP front (content's published 127.0.0.1 port).

WordPress -> (sidecar, watch) -> content -> (fanout, dns+ssh://web) -> every web node. The tests run in
file order on one stack; each uploads what it checks. ``stack.live`` collects every upload that must be
on every node, so the last test (scale-out) checks the whole history on a brand-new node.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.stack.harness import (
    APP_UPLOADS,
    NODE_UPLOADS,
    TIMINGS,
    UPLOADS_URL,
    Media,
    Stack,
    fetch,
    request,
    run,
    wait_for,
)

pytestmark = pytest.mark.stack

SSH_OPTS = (
    "-F /dev/null -i /etc/upsync/ssh/id_ed25519 -o UserKnownHostsFile=/etc/upsync/ssh/known_hosts "
    "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 "
    "-o LogLevel=ERROR"
)


def _report(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))


# ----- least privilege -------------------------------------------------------------------------------


@pytest.mark.involves("sidecar", "fanout", "keys")
@pytest.mark.parametrize(("service", "uid"), [("sidecar", 33), ("fanout", 10001)])
def test_upsync_containers_run_with_least_privilege(stack: Stack, service: str, uid: int) -> None:
    cid = stack.id(service)
    info = stack.compose.inspect(cid)
    host = info["HostConfig"]
    assert info["Config"]["User"] == f"{uid}:{uid}"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not host["Privileged"]
    # What the kernel says about every process in the container: that uid, no capability, no gain.
    # (ssh and rsync children come and go: a process gone before cat reads it is no error.)
    status = stack.compose.exec(cid, "sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null; true").stdout.decode()
    for field in ("Uid", "CapEff", "CapPrm", "NoNewPrivs"):
        lines = [line for line in status.splitlines() if line.startswith(field + ":")]
        values = {value for line in lines for value in line.split(":", 1)[1].split()}  # Uid: real, eff., saved, fs
        expected = {"Uid": str(uid), "CapEff": "0" * 16, "CapPrm": "0" * 16, "NoNewPrivs": "1"}[field]
        assert values == {expected}, f"{service}: {field} {values}"
    # Nothing writable but the runtime tmpfs: not the root, not the source volume.
    for path in ("/probe", "/srv/uploads/probe", "/etc/upsync/ssh/probe"):
        assert stack.compose.exec(cid, "touch", path, check=False).returncode != 0, f"{service} could write {path}"
    assert stack.compose.exec(cid, "touch", "/run/upsync/probe", check=False).returncode == 0
    # Its own key only, private to its uid; no other service's key is even mounted.
    keys = stack.compose.exec(cid, "sh", "-c", "stat -c '%n %a %u' /etc/upsync/ssh/*").stdout.decode().split("\n")
    assert f"/etc/upsync/ssh/id_ed25519 600 {uid}" in keys
    assert sorted(k.split()[0].rsplit("/", 1)[1] for k in keys if k) == ["id_ed25519", "id_ed25519.pub", "known_hosts"]
    # The sync network reaches the ssh targets only: not the app, not the database, at any of their addresses.
    others = [
        (net["IPAddress"], port)
        for name, port in (("app", 80), ("db", 3306))
        for net in stack.compose.inspect(stack.id(name))["NetworkSettings"]["Networks"].values()
    ]
    # (An internal network drops such packets: each probe waits out its timeout, so they run in parallel.)
    probe = (
        "import socket, sys, threading\n"
        "def try_(host, port):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=1.5).close(); print('reached', host, port)\n"
        "    except OSError:\n"
        "        pass\n"
        "ts = [threading.Thread(target=try_, args=a) for a in eval(sys.argv[1])]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
    )
    reached = stack.compose.exec(cid, "python", "-c", probe, repr(others)).stdout.decode()
    assert others and not reached, reached


def test_http_front_is_published_on_loopback_only(stack: Stack) -> None:
    bindings = stack.compose.inspect(stack.id("content"))["HostConfig"]["PortBindings"]
    assert [b["HostIp"] for b in bindings["80/tcp"]] == ["127.0.0.1"]
    for service in ("app", "db", "sidecar", "fanout"):
        assert not stack.compose.inspect(stack.id(service))["HostConfig"]["PortBindings"], f"{service} publishes"
    for cid in stack.compose.ids("web"):
        assert not stack.compose.inspect(cid)["HostConfig"]["PortBindings"]


def test_keys_are_made_once_and_kept(stack: Stack) -> None:
    def fingerprints() -> str:
        files = "/keys/sidecar/id_ed25519.pub /keys/fanout/id_ed25519.pub /keys/*/ssh_host_ed25519_key.pub"
        return stack.compose(
            "run", "--rm", "--no-deps", "--entrypoint", "sh", "keys", "-c", f"cat {files}"
        ).stdout.decode()

    before = fingerprints()
    # A second run (every `up` runs it) keeps every key: nothing to re-pin, nothing to redistribute.
    stack.compose("run", "--rm", "--no-deps", "keys")
    assert fingerprints() == before
    assert stack.ready("sidecar") and stack.ready("fanout")


@pytest.mark.involves("sidecar", "fanout", "content", "web")
@pytest.mark.parametrize("service", ["sidecar", "fanout"])
def test_check_passes_inside_the_hardened_container(stack: Stack, service: str) -> None:
    # `check` connects with the pinned host key and writes and deletes a probe on every target.
    proc = stack.compose.exec(stack.id(service), "python", "-m", "sidecar", "check", check=False, timeout=60)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and "sent and deleted a probe" in out, out
    if service == "fanout":
        assert out.count("sent and deleted a probe") == len(stack.web_nodes()), out


@pytest.mark.involves("content")
def test_image_takes_inline_secrets_and_runs_as_any_uid(stack: Stack) -> None:
    sidecar = stack.id("sidecar")
    key = stack.compose.exec(sidecar, "cat", "/etc/upsync/ssh/id_ed25519").stdout.decode()
    known = stack.compose.exec(sidecar, "cat", "/etc/upsync/ssh/known_hosts").stdout.decode()
    image = stack.compose.inspect(sidecar)["Config"]["Image"]
    run_ = [
        "docker", "run", "--rm", "--network", f"{stack.compose.project}_sync", "--user", "4242:4242",
        "--read-only", "--tmpfs", "/run/upsync", "--tmpfs", "/srv/uploads", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "-e", "SYNC_SSH_KEY", "-e", "SYNC_SSH_KNOWN_HOSTS",
        "-e", "SYNC_TARGETS=ssh://upsync@content/",
    ]  # fmt: skip
    env = {**stack.compose.env, "SYNC_SSH_KEY": key, "SYNC_SSH_KNOWN_HOSTS": known}
    # uid 4242 has no passwd entry (ssh would refuse: "No user exists"); the key and known_hosts are
    # environment text, written by the entrypoint to private files in the tmpfs.
    proc = run([*run_, image, "check"], env=env, check=False, timeout=60)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert "/run/upsync/entrypoint." in out and "sent and deleted a probe" in out, out
    # The inline key and a key file at once: one line on stderr, exit 2, and the key is not echoed.
    proc = run([*run_, "-e", "SYNC_SSH_KEY_FILE=/etc/upsync/ssh/id_ed25519", image], env=env, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("upsync: invalid SYNC_SSH_KEY_FILE=") and err.count("\n") == 1, err
    assert "PRIVATE KEY" not in err + proc.stdout.decode()


# ----- replication -----------------------------------------------------------------------------------


@pytest.mark.involves("app", "sidecar", "content")
def test_upload_is_served_by_content_from_its_own_disk_within_2s(stack: Stack) -> None:
    media, answered = stack.upload("first-light.jpg")
    assert len(media.files) >= 5, f"WordPress made too few sizes: {sorted(media.files)}"
    # Every file, byte for byte, from content, counted from the upload's answer.
    stack.wait_served(media.files, timeout=2.0, nodes={"content": stack.front}, what="the upload and its sizes")
    _report("upload answered -> original and every size served by content", time.monotonic() - answered)

    # From content's own disk: with the app stopped, the uploads are still served, the rest is not.
    stack.compose("stop", "-t", "5", "app")
    try:
        assert request(stack.front + "/wp-json/", timeout=20).status in (502, 503, 504)
        stack.wait_served(media.files, timeout=2.0, nodes={"content": stack.front}, what="uploads with the app down")
    finally:
        stack.compose("start", "app")
        stack.wait_front()


@pytest.mark.involves("fanout", "web", "content")
def test_every_web_node_serves_the_fanout_copy_and_sighup_repairs_drift(stack: Stack) -> None:
    media, answered = stack.upload("fanned-out.jpg")
    webs = stack.web_nodes()
    assert len(webs) == 2
    stack.wait_served(media.files, timeout=15, nodes=webs, what="the upload on every web node")
    _report("upload answered -> served by every web node (watch-mode fanout)", time.monotonic() - answered)

    # Drift on one node (a file nobody uploaded, a file gone) is repaired by the full sync SIGHUP asks for.
    web1 = stack.compose.ids("web")[0]
    victim = sorted(media.files)[0]
    stack.compose.exec(web1, "sh", "-c", f"echo drift > {NODE_UPLOADS}/drift.txt && rm {NODE_UPLOADS}/{victim}")
    assert fetch(webs["web-1"], "drift.txt").status == 200
    stack.compose("kill", "-s", "SIGHUP", "fanout")
    wait_for(lambda: fetch(webs["web-1"], "drift.txt").status == 404, 15, "SIGHUP's full sync to delete drift.txt")
    stack.wait_served(stack.live, timeout=15, nodes=webs, what="every upload after the SIGHUP reconcile")


@pytest.mark.involves("app", "sidecar", "content", "fanout", "web")
def test_delete_through_the_api_removes_every_copy(stack: Stack) -> None:
    media, _ = stack.upload("short-lived.jpg")
    stack.wait_served(media.files, timeout=15)
    stack.delete(media)
    took = stack.wait_gone(media.files, timeout=15)
    _report("delete answered -> 404 on content and every web node", took)
    stack.wait_served(stack.live, timeout=15, what="the other uploads, untouched")


# ----- what the keys may do --------------------------------------------------------------------------


@pytest.mark.involves("sidecar", "fanout", "content", "web")
@pytest.mark.parametrize(("service", "target"), [("sidecar", "content"), ("fanout", "web")])
def test_a_client_key_can_only_write_through_rrsync(stack: Stack, service: str, target: str) -> None:
    cid = stack.id(service)

    def ssh(*args: str) -> tuple[int, str]:
        cmd = f"ssh {SSH_OPTS} {' '.join(args)} </dev/null"
        proc = stack.compose.exec(cid, "sh", "-c", cmd, check=False, timeout=30)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")

    # No command, no shell, no pty: rrsync runs whatever is asked, and refuses what is not rsync.
    code, out = ssh(f"upsync@{target}", "id")
    assert code != 0 and "uid=" not in out and "rrsync" in out, out
    code, out = ssh(f"upsync@{target}")
    assert code != 0 and "rrsync" in out, out
    code, out = ssh("-tt", f"upsync@{target}", "id")
    assert code != 0 and "uid=" not in out, out
    # No forwarding through the target (here: to the app, which this network cannot reach).
    code, out = ssh("-W", "app:80", f"upsync@{target}")
    assert code != 0 and ("prohibited" in out or "forwarding failed" in out), out
    # Write-only: the copy cannot be read back.
    pull = (
        f"d=$(mktemp -d /run/upsync/pull.XXXXXX) && rsync -e 'ssh {SSH_OPTS}' -r upsync@{target}:/ $d/; "
        'rc=$?; n=$(ls -A "$d" | wc -l); echo "rc=$rc files=$n"'
    )
    out = stack.compose.exec(cid, "sh", "-c", pull, timeout=30).stdout.decode()
    assert "rc=0" not in out and "files=0" in out, out
    # Host keys are pinned: another host answering for the target (here a node of the other hop, as a
    # spoofed DNS answer would) is refused before the key is even offered.
    other = "web" if target == "content" else "content"
    impostor = stack.compose.address(stack.compose.ids(other)[0], "sync")
    code, out = ssh("-o", f"HostKeyAlias={target}", f"upsync@{impostor}", "id")
    assert code == 255 and "Host key verification failed" in out, out
    # One key per hop: the other hop's nodes do not take this key at all.
    anykey = SSH_OPTS.replace("StrictHostKeyChecking=yes", "StrictHostKeyChecking=no").replace(
        "UserKnownHostsFile=/etc/upsync/ssh/known_hosts", "UserKnownHostsFile=/dev/null"
    )
    proc = stack.compose.exec(cid, "sh", "-c", f"ssh {anykey} upsync@{other} id </dev/null", check=False)
    assert proc.returncode != 0 and b"Permission denied (publickey)" in proc.stderr, proc.stderr


# ----- nginx -----------------------------------------------------------------------------------------


@pytest.mark.involves("app", "sidecar", "content", "fanout", "web")
def test_nginx_serves_uploads_as_static_data_only(stack: Stack) -> None:
    # What an attacker who can write into the uploads could plant (as www-data, in the app's volume).
    plant = f"""
        set -e; cd {APP_UPLOADS}; mkdir -p plant; cd plant
        echo hello > real.txt
        ln -sf real.txt link.txt
        ln -sf /etc/passwd passwd.txt
        printf '<?php echo "EXEC" . (6*7);' > shell.php
        cp shell.php shell.phtml
        cp shell.php shell.php.jpg
        echo 'Options +Indexes' > .htaccess
        printf '<script>alert(1)</script>' > page.html
        printf '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>' > pic.svg
        printf '%%PDF-1.4 not really' > doc.pdf
        mkdir -p {APP_UPLOADS}/woocommerce_uploads {APP_UPLOADS}/backwpup-1a2b-backups
        echo 'order 1: a paid download' > {APP_UPLOADS}/woocommerce_uploads/order-1.pdf
        echo 'a site backup' > {APP_UPLOADS}/backwpup-1a2b-backups/site.zip
    """
    stack.compose.exec(stack.id("app"), "sh", "-c", plant, user="www-data")
    nodes = stack.nodes()
    wait_for(lambda: all(fetch(b, "plant/shell.php.jpg").status == 200 for b in nodes.values()), 15, "the plant")
    # Replicated as a symlink (it stays inside the tree), so nginx itself must refuse it ...
    content = stack.id("content")
    wait_for(
        lambda: (
            stack.compose.exec(content, "test", "-L", f"{NODE_UPLOADS}/plant/link.txt", check=False).returncode == 0
        ),
        15,
        "the relative symlink on content",
    )
    # ... and links made on the node's own disk, to a file and to a directory outside the tree.
    stack.compose.exec(
        content, "sh", "-c", f"ln -s /etc/passwd {NODE_UPLOADS}/plant/direct.txt && ln -s /etc {NODE_UPLOADS}/etc"
    )

    for name, base in nodes.items():
        listing = [request(base + UPLOADS_URL), request(base + UPLOADS_URL + "plant/")]
        assert all(r.status == 403 and b"Index of" not in r.body for r in listing), (name, listing)
        assert fetch(base, "plant/real.txt").body == b"hello\n"
        # Symlinks are never followed: a linked file is refused (403 where it exists on disk, as on
        # content), a path through a linked directory is not found.
        for rel in ("plant/link.txt", "plant/direct.txt", "etc/passwd"):
            resp = fetch(base, rel)
            refused = (403,) if name == "content" and rel.startswith("plant/") else (403, 404)
            assert resp.status in refused, (name, rel, resp.status)
            assert b"hello" not in resp.body and b"root:" not in resp.body, (name, rel)
        # An absolute link out of the tree is never replicated at all.
        resp = fetch(base, "plant/passwd.txt")
        assert resp.status == 404 and b"root:" not in resp.body, (name, resp.status)
        # Never executed: refused by name, and served as inert bytes under another name.
        for rel in ("plant/shell.php", "plant/shell.phtml"):
            resp = fetch(base, rel)
            assert resp.status == 403 and b"EXEC42" not in resp.body, (name, rel, resp.status)
        resp = fetch(base, "plant/shell.php.jpg")
        assert resp.body.startswith(b"<?php") and b"EXEC42" not in resp.body
        assert resp.headers.get("X-Content-Type-Options") == "nosniff"
        # Script-capable types are sandboxed; others get no CSP (a sandbox blanks inline PDFs in Safari).
        for rel in ("plant/page.html", "plant/pic.svg"):
            assert "sandbox" in fetch(base, rel).headers.get("Content-Security-Policy", ""), (name, rel)
        for rel in ("plant/shell.php.jpg", "plant/doc.pdf", "plant/real.txt"):
            resp = fetch(base, rel)
            assert resp.status == 200 and "Content-Security-Policy" not in resp.headers, (name, rel)
        # Plugins' private folders: never replicated, and refused even where a copy exists.
        for rel in ("woocommerce_uploads/order-1.pdf", "backwpup-1a2b-backups/site.zip"):
            assert fetch(base, rel).status == 404, (name, rel)
        # Dotfiles: never served, in the uploads or anywhere else (not even proxied to the app).
        assert fetch(base, "plant/.htaccess").status == 403
        assert request(base + "/.env").status == 403
    # Defence in depth: the app's own Apache does not run PHP from its uploads either.
    app = f"http://{stack.compose.address(stack.id('app'))}"
    for rel in ("plant/shell.php", "plant/shell.phtml"):
        resp = fetch(app, rel)
        assert resp.status == 403 and b"EXEC42" not in resp.body, ("app", rel, resp.status)
    stack.compose.exec(content, "rm", "-f", f"{NODE_UPLOADS}/plant/direct.txt", f"{NODE_UPLOADS}/etc")
    for private in ("woocommerce_uploads", "backwpup-1a2b-backups"):
        assert stack.compose.exec(content, "test", "-e", f"{NODE_UPLOADS}/{private}", check=False).returncode != 0
    # A copy put on content's disk some other way is not served either (defence in depth).
    stack.compose.exec(
        content, "sh", "-c", f"mkdir -p {NODE_UPLOADS}/wc-logs && echo secret > {NODE_UPLOADS}/wc-logs/fatal.log"
    )
    assert fetch(nodes["content"], "wc-logs/fatal.log").status == 404
    stack.compose.exec(content, "rm", "-rf", f"{NODE_UPLOADS}/wc-logs")


# ----- failures --------------------------------------------------------------------------------------


@pytest.mark.involves("app", "sidecar", "content", "fanout", "web")
def test_content_outage_converges_when_it_returns(stack: Stack) -> None:
    stack.compose("stop", "-t", "5", "content")
    try:
        # The front is down; web nodes proxy to the app too, so the site stays usable through them.
        via = next(iter(stack.web_nodes().values()))
        uploads: dict[str, str] = {}
        for n in range(3):
            media, _ = stack.upload(f"during-outage-{n}.jpg", via=via)
            uploads.update(media.files)
    finally:
        stack.compose("start", "content")
    start = time.monotonic()
    stack.wait_front()
    stack.wait_served(uploads, timeout=60, what="the uploads made while content was down")
    _report("content back -> outage uploads on content and every web node", time.monotonic() - start)
    stack.wait_served(stack.live, timeout=15, what="every upload")


@pytest.mark.involves("app", "sidecar", "content", "fanout", "web")
def test_sidecar_killed_during_a_burst_converges_after_restart(stack: Stack) -> None:
    done: list[Media] = []
    errors: list[BaseException] = []

    def burst() -> None:
        try:
            for n in range(6):
                done.append(stack.upload(f"burst-{n}.jpg")[0])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=burst, name="burst")
    thread.start()
    try:
        wait_for(lambda: len(done) >= 2 or errors, 60, "two uploads of the burst")
        stack.compose("kill", "-s", "SIGKILL", "sidecar")
    finally:
        thread.join(timeout=180)
    assert not thread.is_alive() and not errors, errors
    sidecar = stack.compose.inspect(stack.id("sidecar"))["State"]
    assert not sidecar["Running"] and sidecar["ExitCode"] == 137
    stack.compose("start", "sidecar")
    start = time.monotonic()
    files = {rel: sha for media in done for rel, sha in media.files.items()}
    stack.wait_served(files, timeout=60, what="the whole burst")
    _report("sidecar restarted after SIGKILL -> whole burst everywhere", time.monotonic() - start)
    wait_for(lambda: stack.ready("sidecar"), 30, "the restarted sidecar's /readyz")


# ----- scale-out -------------------------------------------------------------------------------------


@pytest.mark.involves("fanout", "web")
def test_a_new_web_node_gets_the_full_copy_without_config_change(stack: Stack) -> None:
    fanout = stack.compose.inspect(stack.id("fanout"))
    before = set(stack.compose.ids("web"))
    stack.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "web=3", "--wait", "web", timeout=180)
    after = stack.compose.ids("web")
    new = [cid for cid in after if cid not in before]
    assert len(after) == 3 and len(new) == 1
    # Each replica has its own copy (an anonymous volume each, never a shared one), filled by the fanout.
    copies = {
        m["Name"]
        for cid in after
        for m in stack.compose.inspect(cid)["Mounts"]
        if m["Destination"] == NODE_UPLOADS and m["Type"] == "volume"
    }
    assert len(copies) == 3, copies
    node = {"web-new": f"http://{stack.compose.address(new[0])}"}
    took = stack.wait_served(stack.live, timeout=45, nodes=node, what="the full copy on the new node")
    _report(f"--scale web=3 -> new node serves all {len(stack.live)} files", took)
    assert stack.gone and all(fetch(node["web-new"], rel).status == 404 for rel in stack.gone)
    # The fanout was neither restarted nor reconfigured.
    now = stack.compose.inspect(stack.id("fanout"))
    assert (now["Id"], now["State"]["StartedAt"]) == (fanout["Id"], fanout["State"]["StartedAt"])
    stack.wait_served(stack.live, timeout=15, what="every upload on every node")
