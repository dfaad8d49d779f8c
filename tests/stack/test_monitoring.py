"""The `monitoring` compose profile end to end: Prometheus scraping the sidecar and the fanout over their
own network, the alert rules (unit-tested with promtool, and one seen going pending on a real outage),
every query of the Grafana dashboard against the live Prometheus, a screenshot of the latency graph,
and the images' OCI labels.

This module gets its own stack, with the profile (``COMPOSE_PROFILES``); ``test_stack.py`` runs the
stack without it, so both ways of starting it are covered. The tests run in file order on one stack.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time

import pytest

from sidecar import __version__
from tests.stack.harness import (
    APP_UPLOADS,
    COMPOSE_FILE,
    REPO,
    TIMINGS,
    Stack,
    git_revision,
    request,
    run,
    sha256,
    wait_for,
)
from tests.stack.prom import (
    DASHBOARD,
    DASHBOARD_VARIABLES,
    MONITORING_DIR,
    Prometheus,
    PrometheusError,
    dashboard_queries,
    graph_error_shown,
    graph_lines,
    label_values_query,
    numbers,
    pixels_of,
    render,
    substitute,
    variable_queries,
)

COMPOSE_PROFILES = "monitoring"  # read by the stack fixture (conftest.py)
pytestmark = pytest.mark.stack

ALERTS = {
    "UpsyncDown",
    "UpsyncTargetFailing",
    "UpsyncDeleteGuardTripped",
    "UpsyncReplicationSlow",
    "UpsyncNoRecentSync",
    "UpsyncPendingGrowing",
}
SIDECAR_TARGET = "ssh://upsync@content:22/"  # the sidecar's one target, as its metrics name it
METRICS_PORT = 9110
# The graph the docs show: p95 replication latency per daemon and target.
LATENCY_P95 = (
    "histogram_quantile(0.95, sum by (instance, target, le) (rate(upsync_replication_latency_seconds_bucket[5m])))"
)
DOCS_SCREENSHOT = REPO / "docs" / "img" / "prometheus-latency.png"
OCI_LABELS = ("title", "description", "source", "version", "revision", "licenses")


def _report(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Prometheus:
    """The stack's Prometheus (published on 127.0.0.1), once it has scraped both daemons."""
    prom = Prometheus(f"http://127.0.0.1:{stack.compose.env['UPSYNC_PROMETHEUS_PORT']}")

    def both_up() -> bool:
        try:
            return sorted(t["labels"]["instance"] for t in prom.targets() if t["health"] == "up") == [
                "fanout",
                "sidecar",
            ]
        except PrometheusError:
            return False

    _, took = wait_for(both_up, 90, "Prometheus to scrape the sidecar and the fanout", interval=0.5)
    _report("stack healthy -> both scrape targets up", took)
    return prom


def _value(prom: Prometheus, expr: str) -> float:
    """The largest number an instant query returns (0 when it returns nothing)."""
    return max(numbers(prom.query(expr)), default=0.0)


# ----- the rules, without a stack ---------------------------------------------------------------------


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules` and `promtool check config`, with the promtool of the stack's own image.

    The image is built (or found in the build cache) exactly as the stack fixture builds it, so this
    costs about a second; installing Debian's prometheus on the CI host instead would take longer.
    """
    if os.environ.get("UPSYNC_SKIP_STACK") == "1":
        pytest.skip("UPSYNC_SKIP_STACK=1")
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed: the rules are tested with the Prometheus image's promtool")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSYNC_") or k == "UPSYNC_TAG"}
    env.update(COMPOSE_BAKE="false", UPSYNC_REVISION=git_revision())
    project = f"upsync-test-{secrets.token_hex(4)}"  # its untagged leftovers are pruned like the stack's
    compose = ["docker", "compose", "-p", project, "-f", str(COMPOSE_FILE), "--profile", "monitoring"]
    run([*compose, "build", "prometheus"], env=env, timeout=600)
    image = f"upsync/prometheus:{env.get('UPSYNC_TAG', 'local')}"
    start = time.monotonic()
    mount = ["-v", f"{MONITORING_DIR}:/monitoring:ro", "--network", "none", "--entrypoint", "promtool"]
    tested = run(
        ["docker", "run", "--rm", *mount, "-w", "/monitoring/tests", image, "test", "rules", "upsync.test.yml"]
    )
    assert b"SUCCESS" in tested.stdout, tested.stdout
    checked = run(["docker", "run", "--rm", *mount, image, "check", "rules", "/monitoring/rules/upsync.yml"])
    assert b"SUCCESS: 6 rules found" in checked.stdout, checked.stdout
    # The config as baked into the image (its rule_files glob finds the baked rules).
    baked = ["/etc/prometheus/prometheus.yml"]
    run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "promtool", image, "check", "config", *baked])
    _report("promtool test rules + check rules + check config", time.monotonic() - start)


# ----- the profile ------------------------------------------------------------------------------------


@pytest.mark.involves("prometheus", "sidecar", "fanout")
def test_prometheus_scrapes_both_daemons_and_loads_the_rules(stack: Stack, prometheus: Prometheus) -> None:
    urls = {t["labels"]["instance"]: t["scrapeUrl"] for t in prometheus.targets()}
    assert urls == {
        "sidecar": f"http://sidecar-metrics:{METRICS_PORT}/metrics",
        "fanout": f"http://fanout-metrics:{METRICS_PORT}/metrics",
    }
    # The UI pages the docs name (Debian's package serves the classic UI, under /classic/).
    for page in ("/classic/graph", "/classic/alerts", "/classic/targets", "/classic/rules"):
        assert request(prometheus.base + page).status == 200, page
    rules = {rule["name"]: rule for rule in prometheus.rules()}
    assert set(rules) == ALERTS
    assert all(rule["health"] == "ok" for rule in rules.values()), rules
    # upsync_build_info: the version of the code and the revision the images were built from.
    info = {r["metric"]["instance"]: r["metric"] for r in prometheus.query("upsync_build_info")}
    assert sorted(info) == ["fanout", "sidecar"]
    for labels in info.values():
        assert labels["version"] == __version__
        assert labels["revision"] == stack.compose.env["UPSYNC_REVISION"]
    # The reconcile interval each daemon reports (UpsyncNoRecentSync's yardstick): the defaults, 1 hour.
    interval = prometheus.query("upsync_full_sync_interval_seconds")
    assert {r["metric"]["instance"]: float(r["value"][1]) for r in interval} == {"sidecar": 3600, "fanout": 3600}


@pytest.mark.involves("sidecar", "fanout", "web")
def test_metrics_are_reachable_from_the_monitoring_network_only(stack: Stack) -> None:
    compose = stack.compose
    web = compose.ids("web")[0]
    addresses: dict[str, str] = {}
    for service in ("sidecar", "fanout"):
        cid = stack.id(service)
        nets = compose.inspect(cid)["NetworkSettings"]["Networks"]
        assert sorted(n.removeprefix(compose.project + "_") for n in nets) == ["monitoring", "sync"], nets
        for name, net in nets.items():
            addresses[f"{service} on {name.removeprefix(compose.project + '_')}"] = net["IPAddress"]
        # The listening socket is bound to the monitoring address alone (not 0.0.0.0, not the sync one).
        listening = compose.exec(cid, "cat", "/proc/net/tcp").stdout.decode()
        bound = [_ipv4(line.split()[1]) for line in listening.splitlines()[1:] if line.split()[3] == "0A"]
        monitoring_ip = nets[f"{compose.project}_monitoring"]["IPAddress"]
        assert (monitoring_ip, METRICS_PORT) in bound and not any(
            port == METRICS_PORT and ip != monitoring_ip for ip, port in bound
        ), bound
        # ... and the image's HEALTHCHECK (which asks SYNC_HTTP_ADDR) works with it.
        assert compose.exec(cid, "python", "-m", "sidecar", "health", check=False).returncode == 0
    # From a web node (on front and sync): none of those addresses answers, and the names do not resolve.
    content_sync = compose.address(stack.id("content"), "sync")
    probes = {**{k: (ip, METRICS_PORT) for k, ip in addresses.items()}, "control: content ssh": (content_sync, 22)}
    reached = _probe(web, probes)
    assert reached.pop("control: content ssh") == "open", "the probe cannot even reach content's ssh"
    assert all(result != "open" for result in reached.values()), reached
    for name in ("sidecar-metrics", "fanout-metrics"):
        assert compose.exec(web, "getent", "hosts", name, check=False).returncode != 0, f"{name} resolves on web"


def _ipv4(hex_addr: str) -> tuple[str, int]:
    """``/proc/net/tcp``'s ``0100007F:2396`` -> ``("127.0.0.1", 9110)``."""
    ip, port = hex_addr.split(":")
    return ".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16)


_PROBE = """
import json, socket, sys, threading
targets, found = json.loads(sys.argv[1]), {}
def probe(name, host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        found[name] = "open"
    except OSError as exc:
        found[name] = type(exc).__name__
    finally:
        s.close()
threads = [threading.Thread(target=probe, args=(n, h, p)) for n, (h, p) in targets.items()]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(found))
"""


def _probe(container: str, targets: dict[str, tuple[str, int]]) -> dict[str, str]:
    """TCP connects from inside ``container``, in parallel (an internal network drops: each waits 3 s)."""
    out = run(["docker", "exec", container, "python3", "-c", _PROBE, json.dumps(targets)], timeout=60).stdout
    return dict(json.loads(out))


# ----- problems, as Prometheus sees them ------------------------------------------------------------


@pytest.mark.involves("prometheus", "sidecar", "fanout", "content")
def test_a_failing_target_goes_pending_and_problems_are_counted(stack: Stack, prometheus: Prometheus) -> None:
    """Content down: the sidecar's target fails, UpsyncTargetFailing goes pending, failures are counted.
    Meanwhile a FIFO in the uploads (never sent: skipped) and a 5-second stall of the fanout (its watcher
    asks for a full sync: a watcher restart) give the dashboard's problem panels their data."""
    compose = stack.compose
    app = stack.id("app")
    compose.exec(app, "mkfifo", f"{APP_UPLOADS}/monitoring-probe.fifo", user="www-data")
    stack.compose("stop", "-t", "5", "content")
    start = time.monotonic()
    try:
        compose.exec(app, "sh", "-c", f"echo outage > {APP_UPLOADS}/monitoring-outage.txt", user="www-data")
        _stall(stack.id("fanout"), seconds=5)

        def pending() -> list[dict[str, str]]:
            return [
                a["labels"]
                for a in prometheus.alerts()
                if a["labels"]["alertname"] == "UpsyncTargetFailing" and a["state"] in ("pending", "firing")
            ]

        alerts, _ = wait_for(pending, 90, "UpsyncTargetFailing to go pending", interval=0.5)
        _report("content stopped -> UpsyncTargetFailing pending", time.monotonic() - start)
        assert [(a["instance"], a["target"], a["severity"]) for a in alerts] == [
            ("sidecar", SIDECAR_TARGET, "critical")
        ]
        assert prometheus.query('ALERTS{alertname="UpsyncTargetFailing"}'), "no ALERTS series"
        failing = prometheus.query('upsync_target_state{instance="sidecar", state="failing"} == 1')
        assert [r["metric"]["target"] for r in failing] == [SIDECAR_TARGET]
        assert _value(prometheus, f'sum(upsync_failures_total{{instance="sidecar", target="{SIDECAR_TARGET}"}})') > 0
    finally:
        stack.compose("start", "content")
    stack.wait_front()
    wait_for(lambda: stack.ready("sidecar"), 60, "the sidecar's /readyz after content returned")
    stack.wait_served(
        {"monitoring-outage.txt": sha256(b"outage\n")}, timeout=30, what="the file written during the outage"
    )
    wait_for(lambda: not prometheus.query('upsync_target_state{state="failing"} == 1'), 30, "no failing target")
    skipped = 'upsync_skipped_total{instance="sidecar", reason="special"}'
    wait_for(lambda: _value(prometheus, skipped) >= 1, 30, "the FIFO counted as skipped")
    restarts = 'upsync_watcher_restarts_total{instance="fanout"}'
    wait_for(lambda: _value(prometheus, restarts) >= 1, 30, "the fanout's stall counted as a watcher restart")


def _stall(container: str, seconds: float) -> None:
    """Stop the daemon process (SIGSTOP) for ``seconds``: a starved or paused process, as its watcher sees it.

    (docker pause needs the cgroup freezer, which this engine's host may lack; a signal works everywhere.)
    """
    find = (
        'for p in /proc/[0-9]*; do case "$(tr "\\0" " " < $p/cmdline)" in'
        ' "python -m sidecar run"*) echo ${p#/proc/};; esac; done'
    )
    pids = run(["docker", "exec", container, "sh", "-c", find]).stdout.decode().split()
    assert len(pids) == 1, f"expected one daemon process, found {pids}"
    run(["docker", "exec", container, "sh", "-c", f"kill -STOP {pids[0]}"])
    try:
        time.sleep(seconds)  # the fault itself (its length), not a wait for readiness
    finally:
        run(["docker", "exec", container, "sh", "-c", f"kill -CONT {pids[0]}"])


# ----- latency and the dashboard ----------------------------------------------------------------------


@pytest.mark.involves("prometheus", "app", "sidecar", "fanout", "content", "web")
def test_upload_latency_reaches_prometheus_and_every_dashboard_query_returns_data(
    stack: Stack, prometheus: Prometheus
) -> None:
    # One observation per batch a target receives: every target (content, each web node) must get more.
    count = "upsync_replication_latency_seconds_count"

    def counts() -> dict[tuple[str, str], float]:
        return {(r["metric"]["instance"], r["metric"]["target"]): float(r["value"][1]) for r in prometheus.query(count)}

    # Each target's histogram exists at 0 from its worker's start (Metrics.add): wait until Prometheus holds
    # every one, so the uploads below are an increase that rate() can see.
    targets = 1 + len(stack.web_nodes())

    def every_series() -> dict[tuple[str, str], float] | None:
        now = counts()
        return now if len(now) == targets else None

    before, _ = wait_for(every_series, 30, "every target's latency series", interval=0.5)
    files: dict[str, str] = {}
    for n in range(3):
        media, _ = stack.upload(f"monitored-{n}.jpg")
        files.update(media.files)
    stack.wait_served(files, timeout=30, what="the uploads on every node")

    def counted() -> bool:
        now = counts()
        return len(now) == targets and all(now[key] > before.get(key, 0) for key in now)

    _, took = wait_for(counted, 30, "the uploads' latencies in Prometheus", interval=0.5)
    _report("uploads served everywhere -> their latencies in Prometheus", took)

    # rate() needs an increase between two scrapes of a series: the p95 comes one scrape interval after the
    # counts, at most.
    p95: dict[tuple[str, str], dict] = {}

    def p95_of_both() -> bool:
        p95.clear()
        p95.update({(r["metric"]["instance"], r["metric"]["target"]): r for r in prometheus.query(LATENCY_P95)})
        return {i for i, _ in p95} == {"sidecar", "fanout"} and all(numbers([r]) for r in p95.values())

    try:
        _, took = wait_for(p95_of_both, 30, "a p95 latency of the sidecar and of the fanout", interval=0.5)
    except TimeoutError as exc:
        pytest.fail(f"{exc}: {p95}")
    _report("latencies in Prometheus -> a p95 for both daemons", took)

    doc = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(doc)
    assert len(queries) >= 15, queries
    problems = []
    for title, expr in queries:
        promql = substitute(expr, DASHBOARD_VARIABLES)
        try:
            result = prometheus.query(promql)
        except PrometheusError as exc:
            problems.append(f"{title}: {promql}: {exc}")
            continue
        if not numbers(result):
            problems.append(f"{title}: {promql}: no data ({len(result)} series, none a number)")
    assert not problems, "dashboard queries that fail or return nothing:\n" + "\n".join(problems)
    # The variables' choices: both daemons, and every target of each.
    values = {}
    for name, query in variable_queries(doc):
        selector, label = label_values_query(substitute(query, DASHBOARD_VARIABLES))
        values[name] = prometheus.label_values(label, selector)
    assert values["instance"] == ["fanout", "sidecar"]
    assert SIDECAR_TARGET in values["target"] and len(values["target"]) == 1 + len(stack.web_nodes())


@pytest.mark.involves("prometheus")
def test_a_screenshot_of_the_latency_graph(prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prometheus' graph page of the p95 latency, as headless Chromium draws it: one line per target.

    ``UPSYNC_UPDATE_DOCS=1`` also writes it to docs/img/ (the image docs/monitoring.md shows); by default
    it stays in pytest's temporary directory, so a test run leaves the checkout unchanged.
    """
    url = prometheus.graph_url(LATENCY_P95, "2m")  # about as long as the stack has been up
    path = tmp_path_factory.mktemp("screenshot") / DOCS_SCREENSHOT.name
    start = time.monotonic()

    def drawn() -> tuple[dict[str, int], int] | None:
        # The page draws after its own query returns: on a loaded machine Chromium's snapshot can come
        # first (an empty chart), so a snapshot without the lines is taken again, up to the deadline.
        dom, png = render(url, path)
        path.with_suffix(".html").write_text(dom)
        assert not graph_error_shown(dom), f"the graph page shows an error: {dom[-3000:]}"
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        lines = graph_lines(dom)
        # Content, and each web node through the fanout; each line drawn through several points ...
        if len(lines) < 3 or any(points < 2 for points in lines.values()):
            return None
        assert 'instance="sidecar"' in dom and 'instance="fanout"' in dom
        # ... and in the picture too (their colours: lines and legend), not only the page around them.
        pixels = pixels_of(png, lines)
        return (lines, pixels) if pixels >= 100 else None

    try:
        wait_for(drawn, 90, "the latency graph drawn with a line per target", interval=1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the last page: {path} and {path.with_suffix('.html')}") from None
    _report("headless Chromium: graph page drawn and screenshot taken", time.monotonic() - start)
    if os.environ.get("UPSYNC_UPDATE_DOCS") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)


# ----- image metadata ---------------------------------------------------------------------------------


@pytest.mark.involves("sidecar")
def test_every_image_carries_oci_labels_and_the_version(stack: Stack) -> None:
    config = json.loads(stack.compose("config", "--format", "json").stdout)
    built = sorted({svc["image"] for svc in config["services"].values() if "build" in svc})
    assert len(built) >= 5, built  # db, app, sidecar (also the keys service), node, prometheus (and any added since)
    revision = stack.compose.env["UPSYNC_REVISION"]
    for image in built:
        labels = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", image]).stdout)
        oci = {key: labels.get(f"org.opencontainers.image.{key}", "") for key in OCI_LABELS}
        assert all(oci.values()), (image, oci)
        assert oci["version"] == __version__ and oci["revision"] == revision, (image, oci)
        assert oci["source"].startswith("https://") and oci["title"].startswith("upsync-"), (image, oci)
    sidecar = next(image for image in built if image.startswith("upsync/sidecar:"))
    assert run(["docker", "run", "--rm", "--network", "none", sidecar, "--version"]).stdout.decode().strip() == (
        f"upsync {__version__}"
    )
