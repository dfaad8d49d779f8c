"""The deployment files, checked without a cluster: the Kubernetes manifests against the schemas of a current
Kubernetes release (kubernetes-validate), a static security check of them and of every Dockerfile (checkov),
and the invariants the docs promise (non-root pods, the sync path's network policies, the secret names the
keys command prints). The two tools live in .venv-checks (requirements-checks.lock), made by tests/run.sh.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.keys import KUBERNETES_SECRETS, SWARM_SECRETS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
SWARM = REPO / "deploy" / "swarm" / "stack.yml"
CHECKS = REPO / ".venv-checks" / "bin"
DOCKERFILES = sorted(
    str(p.relative_to(REPO))
    for p in [REPO / "Dockerfile", *REPO.glob("compose/*/Dockerfile"), *REPO.glob("tests/*/*/Dockerfile")]
)

MANIFESTS = sorted(str(p.relative_to(REPO)) for p in K8S.glob("*.yaml"))

# Findings checkov reports that do not apply, each with its reason (docs/kubernetes.md lists them). Where
# the file is ours, the reason is an inline `checkov:skip` instead; these are in files of other owners.
ACCEPTED = {
    ("CKV_DOCKER_1", "compose/node/Dockerfile"): "sshd is the node's purpose: port 22 (root mode) carries rsync only, "
    "forced to rrsync -wo for one key-only account; the non-root mode (Kubernetes) uses 2222",
    ("CKV_DOCKER_3", "compose/node/Dockerfile"): "the image starts as root by default for sshd's privilege separation "
    "and drops to the account; started as uid 10001 it runs without root (Kubernetes does so)",
}


def _tool(name: str) -> str:
    path = CHECKS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash tests/run.sh` once (it installs requirements-checks.lock)")
    return str(path)


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) of every Kubernetes object in deploy/kubernetes, in kustomization order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                out.append((name, doc))
    return tuple(out)


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_manifests_validate_against_kubernetes_schemas() -> None:
    files = [str(K8S / name) for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]
    proc = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True, timeout=120, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = re.findall(r"passed for resource (\S+) against version (\S+)", out)
    assert len(passed) == len(documents()), out
    print(f"validated {len(passed)} objects against Kubernetes {passed[0][1]}")


@pytest.mark.parametrize("name", [name for name, _ in workloads()])
def test_every_pod_is_restricted(name: str) -> None:
    pod = dict(workloads())[name]
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0 and ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sec = c["securityContext"]
        assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"] is True, c["name"]
        assert sec["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sec.get("privileged") is False and "runAsUser" not in sec, c["name"]
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, (c["name"], kind)
        assert c["livenessProbe"] and c["readinessProbe"], c["name"]
        if c["image"].startswith("upsync/sidecar"):
            # The daemon's own endpoints, on the pod's address (SYNC_HTTP_ADDR).
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["SYNC_HTTP_ADDR"] == ":9110"
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
            assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_secrets_are_the_ones_the_keys_command_makes() -> None:
    used: dict[str, set[str]] = {}
    for _, pod in workloads():
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                secret = volume["secret"]
                assert secret["defaultMode"] == 0o440, volume  # group-readable for fsGroup, no one else
                used[secret["secretName"]] = set()
        for c in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            secret_of = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
            for e in c.get("env", []):
                value = e.get("value") or ""
                for vol, path in mounts.items():
                    if vol in secret_of and value.startswith(path + "/"):
                        used[secret_of[vol]].add(value.removeprefix(path + "/"))
    made = {f"upsync-{consumer}-ssh": set(files) for consumer, files in KUBERNETES_SECRETS.items()}
    assert used == made


def test_swarm_stack_takes_the_secrets_the_keys_command_makes() -> None:
    stack = yaml.safe_load(SWARM.read_text())
    names = {
        spec["name"].replace("${UPSYNC_SECRETS:-upsync}-", "") for spec in stack["secrets"].values() if spec["external"]
    }
    assert names == {suffix for suffix, _ in SWARM_SECRETS}
    for service, spec in stack["services"].items():
        assert "build" not in spec and spec["image"].endswith(":${UPSYNC_TAG:-local}"), service
        assert "healthcheck" in spec and "update_config" in spec["deploy"], service
        for secret in spec.get("secrets", []):
            # Private keys readable by their consumer only; the uid is the service's own.
            if secret["source"].endswith("_key"):
                assert secret["mode"] == 0o400, (service, secret)
            uid = re.split(r":(?![-=?])", spec.get("user", "0:0"))[0]  # "${UID:-33}:${GID:-33}" -> "${UID:-33}"
            assert secret["uid"] == uid, (service, secret)
    networks = stack["networks"]
    assert networks["sync"]["internal"] is True and networks["data"]["internal"] is True
    assert stack["services"]["sidecar"]["networks"] == ["sync"] and stack["services"]["fanout"]["networks"] == ["sync"]
    placement = {s: spec["deploy"]["placement"]["constraints"] for s, spec in stack["services"].items()}
    assert placement["sidecar"] == placement["app"] and placement["fanout"] == placement["content"]


def _selects(policy: dict[str, Any], name: str) -> bool:
    sel = policy["spec"]["podSelector"]
    if not sel:
        return True
    if "matchLabels" in sel:
        return sel["matchLabels"].get("app.kubernetes.io/name") == name
    return any(name in e["values"] for e in sel["matchExpressions"] if e["operator"] == "In")


def _peers(rule_peers: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for peer in rule_peers:
        sel = peer.get("podSelector", {})
        if "namespaceSelector" in peer:
            names.add("other-namespace")
        elif "matchLabels" in sel:
            names.add(sel["matchLabels"]["app.kubernetes.io/name"])
        else:
            names.update(v for e in sel.get("matchExpressions", []) for v in e["values"])
    return names


def test_network_policies_open_only_the_sync_path_on_ssh() -> None:
    policies = [doc for _, doc in documents() if doc["kind"] == "NetworkPolicy"]
    everyone = {"db", "app", "content", "web"}
    default_deny = [
        p for p in policies if not p["spec"]["podSelector"] and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert default_deny and not any(default_deny[0]["spec"].get(k) for k in ("ingress", "egress"))
    # (from, to) pairs allowed on the sshd port, by ingress rules and by egress rules.
    ingress, egress = set(), set()
    for p in policies:
        for target in everyone:
            if not _selects(p, target):
                continue
            for rule in p["spec"].get("ingress", []):
                if any(port["port"] == 2222 for port in rule.get("ports", [])):
                    ingress |= {(src, target) for src in _peers(rule.get("from", [{"podSelector": {}}]))}
            for rule in p["spec"].get("egress", []):
                if any(port["port"] == 2222 for port in rule.get("ports", [])):
                    egress |= {(target, dst) for dst in _peers(rule.get("to", []))}
    # sidecar (app pod) -> content, fanout (content pod) -> web: nothing else, in either direction.
    assert ingress == egress == {("app", "content"), ("content", "web")}


def test_checkov_finds_nothing_unjustified() -> None:
    proc = subprocess.run(
        [
            _tool("checkov"), "--framework", "kubernetes", "dockerfile",
            *(arg for f in (*MANIFESTS, *DOCKERFILES) for arg in ("-f", f)),
            "--skip-download", "--quiet", "--compact", "-o", "json",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "BC_SKIP_MAPPING": "TRUE", "HOME": str(REPO / ".venv-checks")},
    )  # fmt: skip
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    failed: dict[tuple[str, str], str] = {}
    skipped: list[tuple[str, str, str]] = []
    frameworks = set()
    for report in reports:
        frameworks.add(report["check_type"])
        for check in report["results"].get("failed_checks", []):
            failed[(check["check_id"], check["repo_file_path"].lstrip("/"))] = check["check_name"]
        for check in report["results"].get("skipped_checks", []):
            skipped.append((check["check_id"], check["repo_file_path"].lstrip("/"), check.get("suppress_comment", "")))
    assert frameworks == {"kubernetes", "dockerfile"}, frameworks
    assert set(failed) == set(ACCEPTED), {k: v for k, v in failed.items() if k not in ACCEPTED}
    # Every finding skipped in a file says why.
    assert all(len(reason.strip()) > 20 for _, _, reason in skipped), skipped
