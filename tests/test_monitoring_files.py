"""The monitoring files without Docker: the dashboard is importable and uses only metrics upsync exports,
the alert rules name real metrics and each has a promtool case, every image's version label agrees
with the code, and the helpers the stack test relies on decide right (table tests).

The live checks (promtool, every dashboard query against a running Prometheus, the screenshot, the
labels of the built images) are in tests/stack/test_monitoring.py.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar.metrics import Metrics
from tests.stack.prom import (
    DASHBOARD,
    DASHBOARD_VARIABLES,
    MONITORING_DIR,
    dashboard_queries,
    graph_error_shown,
    graph_lines,
    label_values_query,
    pixels_of,
    substitute,
    variable_queries,
)

REPO = Path(__file__).resolve().parents[1]
RULES = MONITORING_DIR / "rules" / "upsync.yml"
RULE_TESTS = MONITORING_DIR / "tests" / "upsync.test.yml"
DOCKERFILES = [REPO / "Dockerfile", *sorted((REPO / "compose").glob("*/Dockerfile"))]
OCI_LABELS = ("title", "description", "source", "version", "revision", "licenses")

# The metrics the dashboard must show (README "Health and metrics"); newer ones may be added to it later.
DOCUMENTED = (
    "upsync_events_total",
    "upsync_syncs_total",
    "upsync_files_sent_total",
    "upsync_bytes_sent_total",
    "upsync_files_deleted_total",
    "upsync_files_unchanged_total",
    "upsync_failures_total",
    "upsync_pending_paths",
    "upsync_last_success_timestamp_seconds",
    "upsync_delete_guard_tripped",
    "upsync_skipped_total",
    "upsync_watcher_restarts_total",
    "upsync_ready",
    "upsync_replication_latency_seconds",
    "upsync_target_state",
    "upsync_full_sync_interval_seconds",
    "upsync_build_info",
)
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}


def _exported() -> set[str]:
    """Every sample name upsync's registry can serve (labelled metrics have none until first used)."""
    metrics = Metrics()
    metrics.set_readiness(lambda: True, lambda: [])
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
    return {name for name in names if name.startswith("upsync_")}


def _names(text: str) -> set[str]:
    return set(re.findall(r"\bupsync_[a-z_]+[a-z]\b", text))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# ----- the dashboard ----------------------------------------------------------------------------------


def test_the_dashboard_is_importable(dashboard: dict) -> None:
    assert dashboard["uid"] == "upsync" and dashboard["title"] == "upsync" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # A datasource variable instead of a fixed uid: the file imports into any Grafana (UI or provisioning).
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["description"], f"{panel['title']}: say what the panel shows"
    # Every query's variables have a value in the stack test (which runs them all against Prometheus).
    for _, expr in [*dashboard_queries(dashboard), *variable_queries(dashboard)]:
        substitute(expr, DASHBOARD_VARIABLES)


def test_the_dashboard_shows_every_documented_metric_and_only_exported_ones(dashboard: dict) -> None:
    used = set().union(*(_names(expr) for _, expr in dashboard_queries(dashboard) + variable_queries(dashboard)))
    assert used <= _exported(), used - _exported()
    for metric in DOCUMENTED:
        assert any(name.startswith(metric) for name in used), f"no panel shows {metric}"


# ----- the rules --------------------------------------------------------------------------------------


def test_the_rules_use_exported_metrics_and_each_alert_has_unit_tests() -> None:
    rules = RULES.read_text()
    assert _names(rules) <= _exported(), _names(rules) - _exported()
    alerts = re.findall(r"^\s+- alert: (\w+)$", rules, re.M)
    assert len(alerts) == 6
    tests = RULE_TESTS.read_text()
    for alert in alerts:
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\n|\Z)", tests, re.S)
        fires = [case for case in cases if "exp_labels" in case]
        silent = [case for case in cases if case.strip() == "[]"]
        assert fires and silent, f"{alert}: needs a case where it fires and one where it does not"


# ----- image metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_dockerfile_ends_with_the_oci_labels(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    last_stage = text.rsplit("\nFROM ", 1)[-1]
    assert f"ARG UPSYNC_VERSION={__version__}\n" in last_stage, "the version default must be sidecar.__version__"
    assert "ARG UPSYNC_REVISION=unknown\n" in last_stage
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in last_stage, key
    # The sidecar also tells its revision to the daemon (upsync_build_info).
    if dockerfile == REPO / "Dockerfile":
        assert "ENV UPSYNC_REVISION=${UPSYNC_REVISION}" in last_stage


def test_the_compose_file_passes_the_version_every_image_is_labelled_with() -> None:
    compose = (REPO / "compose" / "docker-compose.yml").read_text()
    assert f"UPSYNC_VERSION: ${{UPSYNC_VERSION:-{__version__}}}" in compose
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject
    builds = re.findall(r"^    build: (.*)$", compose, re.M)
    assert len(builds) >= 5 and all("args: *build-args" in build for build in builds), builds


# ----- the stack test's helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('rate(x{instance=~"$instance"}[$__rate_interval])', 'rate(x{instance=~".*"}[1m])'),
        ('x{instance=~"${instance}"}', 'x{instance=~".*"}'),
        ('x{instance=~"${instance:regex}"}', 'x{instance=~".*"}'),
        ('x{target=~"[[target]]"}', 'x{target=~".*"}'),
        ("sum(x)", "sum(x)"),
    ],
)
def test_substitute_grafana_variables(expr: str, expected: str) -> None:
    assert substitute(expr, DASHBOARD_VARIABLES) == expected


def test_substitute_refuses_an_unknown_variable() -> None:
    with pytest.raises(KeyError, match=r"\$job"):
        substitute('x{job="$job"}', DASHBOARD_VARIABLES)


def test_label_values_query_refuses_other_variable_queries() -> None:
    with pytest.raises(ValueError, match="label_values"):
        label_values_query("query_result(up)")


@pytest.mark.parametrize(
    ("dom", "shown"),
    [
        ('<div class="error alert alert-danger" style="display: none;">', False),
        ('<div class="error alert alert-danger" style="">parse error</div>', True),
        ('<div class="error alert alert-danger">bad_data</div>', True),
        ("<html></html>", False),
    ],
)
def test_graph_error_shown(dom: str, shown: bool) -> None:
    assert graph_error_shown(dom) is shown


def test_graph_lines_counts_the_points_of_each_line() -> None:
    dom = (
        '<path class="path" d="M1,2L3,4" fill="none" stroke="#CB513A" stroke-width="2">'
        '<path class="stroke" d="M0,0">'
        '<path class="path" d="M1,2" fill="none" stroke="#73c03a" stroke-width="2">'
    )
    assert graph_lines(dom) == {"#cb513a": 2, "#73c03a": 1}


def test_pixels_of_tells_a_drawn_line_from_a_blank_page() -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 100), "white")
    blank = io.BytesIO()
    image.save(blank, "PNG")
    ImageDraw.Draw(image).line([(10, 50), (190, 50)], fill="#cb513a", width=2)
    drawn = io.BytesIO()
    image.save(drawn, "PNG")
    assert pixels_of(blank.getvalue(), ["#cb513a"]) == 0
    assert pixels_of(drawn.getvalue(), ["#cb513a"]) >= 300
    assert pixels_of(drawn.getvalue(), ["#0000ff"]) == 0
