"""The monitoring profile from the outside: Prometheus' HTTP API, the Grafana dashboard's queries, and
headless Chromium (Debian's ``chromium``) for the graph page.

The pure parts (reading the dashboard, substituting Grafana's variables, telling a drawn graph from a
blank page) are unit-tested in ``tests/test_monitoring_files.py``; the rest runs in the stack test.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.stack.harness import REPO, request

MONITORING_DIR = REPO / "compose" / "monitoring"
DASHBOARD = MONITORING_DIR / "grafana" / "upsync.json"

# What each Grafana variable of the dashboard stands for when its queries are run against Prometheus:
# every daemon and target ("All"), and the rate window Grafana picks for short ranges (4 scrape intervals
# at Grafana's default 15 s).
DASHBOARD_VARIABLES = {"instance": ".*", "target": ".*", "datasource": "", "__rate_interval": "1m"}

# Chromium in a container-like CI: no sandbox (root), no GPU, nothing fetched from Google.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # Let the page's scripts fetch the data and draw before the snapshot (virtual time runs ahead).
    "--virtual-time-budget=10000",
)


# ----- the dashboard -------------------------------------------------------------------------------


def dashboard_queries(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query in a Grafana dashboard, rows' nested panels included.

    >>> dashboard_queries({"panels": [{"type": "row", "panels": [{"title": "a", "targets": [{"expr": "up"}]}]}]})
    [('a', 'up')]
    """
    found: list[tuple[str, str]] = []

    def walk(panels: Sequence[Mapping[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((str(panel.get("title", "")), str(target["expr"])))
            walk(panel.get("panels", []))

    walk(doc.get("panels", []))
    return found


def variable_queries(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(variable name, query)`` of the dashboard's query variables (``label_values(...)``)."""
    found = []
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query") if isinstance(query, Mapping) else query
            found.append((str(var["name"]), str(text or var.get("definition", ""))))
    return found


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana's variables (``$name``, ``${name}``, ``${name:fmt}``, ``[[name]]``) by their values.

    Raises:
        KeyError: a variable without a value (the dashboard uses one the test does not know).
    """

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for the dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def label_values_query(text: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> ``(selector, label)``.

    >>> label_values_query('label_values(upsync_target_state{instance=~".*"}, target)')
    ('upsync_target_state{instance=~".*"}', 'target')
    """
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
    if not match:
        raise ValueError(f"not a label_values(selector, label) query: {text!r}")
    return match.group(1).strip(), match.group(2)


# ----- Prometheus' HTTP API --------------------------------------------------------------------------


class PrometheusError(AssertionError):
    """Prometheus refused a query (a parse error, a bad label matcher ...) or did not answer."""


class Prometheus:
    """A Prometheus server's HTTP API (``/api/v1``)."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        resp = request(url, timeout=15)
        if resp.status == 0:
            raise PrometheusError(f"{url}: no answer ({resp.body.decode(errors='replace')})")
        try:
            doc = json.loads(resp.body)
        except ValueError:
            raise PrometheusError(f"{url}: {resp.status} {resp.body[:300]!r}") from None
        if resp.status != 200 or doc.get("status") != "success":
            raise PrometheusError(f"{params or path}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the server's now; the result as Prometheus returns it (vector or scalar)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._get(f"/api/v1/label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def graph_url(self, expr: str, range_input: str = "10m") -> str:
        """The classic UI's graph page (Debian's package ships that UI) showing ``expr``."""
        params = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": range_input}
        return f"{self.base}/classic/graph?" + urllib.parse.urlencode(params)


def numbers(result: Sequence[Mapping[str, Any]]) -> list[float]:
    """The sample values of a query result that are numbers (NaN and infinities left out)."""
    values = [float(sample["value"][1]) for sample in result]
    return [v for v in values if math.isfinite(v)]


# ----- headless Chromium -------------------------------------------------------------------------------


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    binary = chromium()
    if binary is None:
        raise AssertionError("chromium is not installed: `bash tests/run.sh` installs Debian's chromium")
    # A fresh profile per run: nothing from an earlier run (or the user's own browser) leaks in.
    with tempfile.TemporaryDirectory(prefix="upsync-chromium-") as profile:
        proc = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise AssertionError(f"chromium exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc


def render(url: str, path: Path, size: tuple[int, int] = (1280, 900), timeout: float = 120) -> tuple[str, bytes]:
    """One Chromium run: the page's DOM after its scripts ran, and a PNG of it (also written to ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = _chromium([f"--window-size={size[0]},{size[1]}", "--dump-dom", f"--screenshot={path}", url], timeout)
    return proc.stdout.decode(errors="replace"), path.read_bytes()


# ----- what a drawn graph looks like -------------------------------------------------------------------

_PATH = re.compile(r'<path class="path" d="([^"]+)"[^>]*stroke="(#[0-9a-fA-F]{6})"')


def graph_lines(dom: str) -> dict[str, int]:
    """Stroke colour -> points of each line the classic graph page drew (its SVG ``path.path`` elements).

    >>> graph_lines('<path class="path" d="M1,2L3,4L5,6" fill="none" stroke="#cb513a" stroke-width="2">')
    {'#cb513a': 3}
    """
    return {color.lower(): len(re.findall(r"[ML]", d)) for d, color in _PATH.findall(dom)}


def graph_error_shown(dom: str) -> bool:
    """The page's error box (a bad query, an unreachable server) is visible."""
    box = re.search(r'<div class="error alert alert-danger"([^>]*)>', dom)
    return bool(box and "display: none" not in box.group(1))


def pixels_of(png: bytes, colors: Iterable[str], tolerance: int = 40) -> int:
    """How many pixels of the image are within ``tolerance`` (per channel) of one of ``colors``."""
    from PIL import Image  # the only test that needs Pillow; imported here so the rest loads without it

    wanted = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in colors]
    image = Image.open(io.BytesIO(png)).convert("RGB")
    count = 0
    for n, pixel in image.getcolors(maxcolors=image.width * image.height) or []:
        if any(all(abs(pixel[i] - w[i]) <= tolerance for i in range(3)) for w in wanted):
            count += n
    return count
