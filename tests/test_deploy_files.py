"""The deployment files: the kustomize base and overlays under k8s/, the gateway examples under
deploy/examples/, the Dockerfile and .dockerignore.

Nothing here needs a cluster, an Envoy or a Docker engine, and nothing goes to the network. Every
overlay is rendered with ``kubectl kustomize`` (kustomize v5 is built into kubectl; .ci/system-deps
checks for it) and every rendered object is validated offline: built-in kinds against the
Kubernetes OpenAPI schemas of pinned versions (the kubernetes-validate package, strict: unknown
fields fail), ServiceMonitor and PrometheusRule against models generated from the Prometheus
Operator CRD schemas (cloudcoil.models.prometheus_operator, with unknown fields failing too), the
sidecar config in each ConfigMap through ``load_config``, each sidecar container's args and
environment through the real ``serve`` option resolution, and every Envoy config by parsing it
into Envoy's own v3 ``Bootstrap`` proto (xds-protos), typed_config messages included.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # no type hints shipped
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

# Neither protobuf's runtime nor the generated Envoy modules ship type hints.
from envoy.config.bootstrap.v3 import bootstrap_pb2  # type: ignore[import-untyped]
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # type: ignore[import-untyped]
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # type: ignore[import-untyped]
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

from sidecar.cli import build_parser
from sidecar.config import Config, load_config
from sidecar.options import ENV, resolve

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
EXAMPLES = ROOT / "deploy" / "examples"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

OVERLAYS = ("dev", "beside-envoy", "beside-nginx")
TARGETS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
# The oldest and the newest Kubernetes minor this project supports; schemas of both must accept
# every object.
K8S_VERSIONS = ("1.30", "1.34")
CRD_MODELS: dict[tuple[str, str], type[Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
}

SIDECAR = "admission-sidecar"  # the sidecar's container name in every overlay
CONFIG_PATH = "/etc/admission-sidecar/config.yaml"
SECRET = "admission-sidecar-secrets"  # created by the platform's secret manager (base, beside-*)
SECRET_KEYS = {"redis-url", "ticket-secret", "admin-token"}
DATA_PORT, ADMIN_PORT = 8080, 9090
IMAGE_UID = 10001
JOB = "admission-sidecar"  # the job label prometheusrule.yaml and the dashboard select
POD_NAME = "admission-sidecar-5d8c7b9f6-x2x9q"  # stands in for the fieldRef

Doc = dict[str, Any]


@functools.cache
def kubectl() -> str:
    """kubectl with kustomize v5 built in; fails (never skips) without it."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl (with kustomize v5 built in) renders k8s/ and is not installed: run "
            ".ci/system-deps, which says how to get it",
            pytrace=False,
        )
    version = subprocess.run(
        [found, "version", "--client"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    if not re.search(r"^Kustomize Version: v[5-9]", version, re.MULTILINE):
        pytest.fail(
            f"{found} lacks kustomize v5 ({version.strip()}): see .ci/system-deps", pytrace=False
        )
    return found


@functools.cache
def _render(target: str) -> tuple[Doc, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize k8s/{target}: {done.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)
    assert docs, f"k8s/{target} renders nothing"
    return docs


def render(target: str) -> list[Doc]:
    """The objects ``kubectl kustomize k8s/<target>`` renders (fresh copies: tests may edit)."""
    copies: list[Doc] = json.loads(json.dumps(_render(target)))
    return copies


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in pod(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']}: expected one {name!r} container"
    return found[0]


def sidecar_deployment(docs: list[Doc]) -> Doc:
    found = [
        d
        for d in of_kind(docs, "Deployment")
        if any(c["name"] == SIDECAR for c in pod(d)["containers"])
    ]
    assert len(found) == 1, "expected one Deployment with the sidecar"
    return found[0]


def env(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def volume_for(deployment: Doc, c: Doc, mount_path: str) -> Doc:
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == mount_path]
    volumes: list[Doc] = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    (volume,) = volumes
    return volume


def config_text(docs: list[Doc]) -> str:
    deployment = sidecar_deployment(docs)
    directory, _, key = CONFIG_PATH.rpartition("/")
    volume = volume_for(deployment, container(deployment, SIDECAR), directory)
    text: str = one(docs, "ConfigMap", volume["configMap"]["name"])["data"][key]
    return text


def config(docs: list[Doc]) -> Config:
    return load_config(config_text(docs))


def port_number(c: Doc, port: int | str) -> int:
    """A probe's or Service's port, resolving a named port against the container's ports."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"{c['name']}: no port named {port!r}"
    return int(named[port])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    """Paths present in ``given`` but not in ``known`` (a model's dump of what it accepted)."""
    if isinstance(given, dict) and isinstance(known, dict):
        return [
            p
            for k, v in given.items()
            for p in (
                [f"{path}.{k}"] if k not in known else unknown_fields(v, known[k], f"{path}.{k}")
            )
        ]
    if isinstance(given, list) and isinstance(known, list) and len(given) == len(known):
        return [
            p
            for i, (g, k) in enumerate(zip(given, known, strict=True))
            for p in unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


targets = pytest.mark.parametrize("target", TARGETS)


# --- rendering and schemas --------------------------------------------------------------------


def test_layout_is_a_base_and_overlays() -> None:
    assert (K8S / "base" / "kustomization.yaml").is_file()
    found = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert found == set(OVERLAYS), "an overlay is not rendered and validated by these tests"


@targets
def test_renders_the_objects_a_platform_team_expects(target: str) -> None:
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert "HorizontalPodAutoscaler" in kinds
    if target == "overlays/dev":
        # No Prometheus Operator on a dev cluster; a Redis and a Secret of its own.
        assert not kinds & {"ServiceMonitor", "PrometheusRule"}
        assert {"Secret", "Namespace"} <= kinds
    else:
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds
        assert "Secret" not in kinds, "outside dev, the Secret comes from a secret manager"
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "two objects of one kind share a name"


@targets
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_matches_its_schema(target: str, version: str) -> None:
    for doc in render(target):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
        if model is not None:
            accepted = model.model_validate(doc).model_dump(
                by_alias=True, exclude_unset=True, mode="json"
            )
            assert not unknown_fields(doc, accepted), f"{where}: not in the CRD schema"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {doc['apiVersion']} in Kubernetes {version}")


def test_schema_validation_catches_a_broken_manifest() -> None:
    """The checks above fail on the mistakes they are there for."""
    deployment = sidecar_deployment(render("base"))
    container(deployment, SIDECAR)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    rule = one(render("base"), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    accepted = monitoring.PrometheusRule.model_validate(rule).model_dump(
        by_alias=True, exclude_unset=True, mode="json"
    )
    assert unknown_fields(rule, accepted) == [".spec.groups[0].rules[0].expresion"]


def test_manifests_in_the_notes_match_their_schema() -> None:
    """The YAML examples of k8s/README.md that are Kubernetes objects (the model server HPA)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (K8S / "README.md").read_text(), re.DOTALL)
    objects = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict)]
    assert objects, "k8s/README.md shows no manifest"
    for doc in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


# --- the sidecar config and its secrets -----------------------------------------------------------


@targets
def test_configmap_holds_a_valid_config_without_secrets(target: str) -> None:
    docs = render(target)
    parsed = config(docs)  # the real schema: unknown keys and bad values raise ConfigError
    assert parsed.redis.url is None, "the Redis URL (it may carry a password) belongs in a Secret"
    for cm in of_kind(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            where = f"ConfigMap {cm['metadata']['name']}/{key}"
            assert "redis://" not in text and "rediss://" not in text, where
            if not key.endswith(".yaml"):
                continue
            for name, value in _leaves(yaml.safe_load(text)):
                assert not any(w in name.lower() for w in ("password", "secret", "token")), where
                assert "@" not in value, f"{where}: {name} looks like a credential"


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, value) of every scalar in a parsed YAML document (comments are not data)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, str(node)


@targets
def test_secrets_come_from_the_secret(target: str) -> None:
    docs = render(target)
    deployment = sidecar_deployment(docs)
    sidecar = container(deployment, SIDECAR)
    variables = env(sidecar)
    names = set()
    ref = variables["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    names.add(ref["name"])
    assert ref["key"] == "redis-url"
    for variable, key in (
        ("SIDECAR_TICKET_SECRET_FILE", "ticket-secret"),
        ("SIDECAR_ADMIN_TOKEN_FILE", "admin-token"),
    ):
        directory, _, filename = variables[variable]["value"].rpartition("/")
        secret = volume_for(deployment, sidecar, directory)["secret"]
        names.add(secret["secretName"])
        assert {"key": key, "path": filename} in secret["items"]
        assert secret["defaultMode"] == 0o440
    for forbidden in ("SIDECAR_TICKET_SECRET", "SIDECAR_ADMIN_TOKEN"):
        assert forbidden not in variables, f"{forbidden} inline: mount it as a file"
    (name,) = names
    secrets = of_kind(docs, "Secret")
    if target == "overlays/dev":
        assert set(one(docs, "Secret", name)["data"]) == SECRET_KEYS
    else:
        assert name == SECRET and not secrets


@targets
def test_args_and_env_resolve_to_the_intended_settings(target: str, tmp_path: Path) -> None:
    """The container's args and environment through the real CLI parser and option resolution."""
    docs = render(target)
    deployment = sidecar_deployment(docs)
    sidecar = container(deployment, SIDECAR)
    variables = env(sidecar)
    assert set(variables) <= set(ENV.values()), "an env var the sidecar does not read"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text(docs))
    resolved_env = {name: e["value"] for name, e in variables.items() if "value" in e}
    resolved_env |= {
        "SIDECAR_CONFIG": str(config_file),
        "SIDECAR_REPLICA_ID": POD_NAME,
        "REDIS_URL": "redis://:password@redis.example:6379/0",
    }
    for variable in ("SIDECAR_TICKET_SECRET_FILE", "SIDECAR_ADMIN_TOKEN_FILE"):
        path = tmp_path / Path(resolved_env[variable]).name
        path.write_text(f"{variable}-value\n")
        resolved_env[variable] = str(path)
    args = build_parser().parse_args(sidecar["args"])
    assert args.command == "serve"
    options = resolve(args, resolved_env)
    # Probes and Prometheus reach the admin port on the pod IP; the data port is on the pod IP for
    # a pool of its own, on loopback when a gateway in the same pod is the only client.
    assert options.admin_listen == ("0.0.0.0", ADMIN_PORT)
    beside = target.startswith("overlays/beside-")
    assert options.listen == ("127.0.0.1" if beside else "0.0.0.0", DATA_PORT)
    assert options.upstream == resolved_env["SIDECAR_UPSTREAM"].rstrip("/")
    assert options.replica_id.startswith(f"{POD_NAME}-")
    assert options.config == config(docs)
    assert options.ticket_secret is not None and options.admin_token is not None
    assert options.ticket_secret.reveal() == b"SIDECAR_TICKET_SECRET_FILE-value"


# --- the pods -------------------------------------------------------------------------------------


@targets
def test_every_container_meets_the_restricted_pod_security_standard(target: str) -> None:
    for deployment in of_kind(render(target), "Deployment"):
        spec = pod(deployment)
        pod_ctx = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        for c in spec["containers"]:
            where = f"{deployment['metadata']['name']}/{c['name']}"
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert not ctx.get("privileged"), f"{where}: privileged"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}"
            resources = c.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: resources"
            assert resources["limits"].get("memory"), f"{where}: no memory limit"


@targets
def test_sidecar_runs_as_the_image_user(target: str) -> None:
    deployment = sidecar_deployment(render(target))
    ctx = {
        **pod(deployment)["securityContext"],
        **container(deployment, SIDECAR)["securityContext"],
    }
    assert ctx["runAsUser"] == IMAGE_UID == dockerfile_uid()


@targets
def test_probes_on_the_admin_port(target: str) -> None:
    sidecar = container(sidecar_deployment(render(target)), SIDECAR)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(sidecar, get["port"]) == ADMIN_PORT, probe


def _prestop_seconds(c: Doc) -> float:
    """How long a container's preStop hook may hold its SIGTERM: ``sleep N``, or a loop of at
    most N one-second waits (``for _ in $(seq N)``)."""
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if command[:1] == ["sleep"]:
        return float(command[1])
    loop = re.search(r"\$\(seq (\d+)\)", " ".join(command))
    return float(loop.group(1)) if loop else 0.0


@targets
def test_grace_period_covers_prestop_and_drain(target: str) -> None:
    """Endpoints propagate during the preStop sleep, then the drain runs; neither is cut short."""
    docs = render(target)
    deployment = sidecar_deployment(docs)
    sidecar = container(deployment, SIDECAR)
    prestop = _prestop_seconds(sidecar)
    assert prestop >= 3, "a preStop sleep lets endpoint removal reach the gateways first"
    drain = config(docs).server.shutdown_grace_period
    grace = pod(deployment)["terminationGracePeriodSeconds"]
    assert grace >= prestop + drain + 5
    for other in pod(deployment)["containers"]:
        assert _prestop_seconds(other) < grace, other["name"]
    if target == "overlays/beside-envoy":
        # Envoy exits at once on SIGTERM, and the drain streams through it: its hook waits for
        # the sidecar to finish, for at least as long as the sidecar may take.
        assert _prestop_seconds(container(deployment, "envoy")) >= prestop + drain
    if target == "overlays/beside-nginx":
        # nginx stops gracefully (SIGQUIT) after the same preStop as the sidecar, finishing what
        # runs through it for up to worker_shutdown_timeout.
        assert _prestop_seconds(container(deployment, "nginx")) == prestop
        conf = _gateway_config(docs, "nginx", "nginx.conf")
        timeout = re.search(r"worker_shutdown_timeout (\d+)s;", conf)
        assert timeout and drain <= float(timeout.group(1)) < grace


@targets
def test_services_budget_and_autoscaler_find_their_pods(target: str) -> None:
    docs = render(target)
    deployment = sidecar_deployment(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    containers = pod(deployment)["containers"]
    ports = {p["name"]: (c, p["containerPort"]) for c in containers for p in c.get("ports", [])}
    services = of_kind(docs, "Service")
    for service in services:
        name = service["metadata"]["name"]
        if service["spec"]["selector"].get("app.kubernetes.io/name") == "admission-redis":
            continue
        assert selects(service["spec"]["selector"], labels), f"Service {name} selects nothing"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no port {port['targetPort']}"
    data = one(docs, "Service", "inference-gateway" if "beside-" in target else SIDECAR)
    (port,) = data["spec"]["ports"]
    owner, number = ports[port["targetPort"]]
    # The data Service reaches the sidecar, or the gateway in front of it; never the admin port.
    gateway = target.removeprefix("overlays/beside-") if "beside-" in target else SIDECAR
    assert owner["name"] == gateway
    assert number != ADMIN_PORT
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica down must leave one admitting"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@targets
def test_servicemonitor_scrapes_the_admin_port_as_the_rules_expect(target: str) -> None:
    docs = render(target)
    if target == "overlays/dev":
        return  # no Prometheus Operator there (see test_renders_the_objects_...)
    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in of_kind(docs, "Service") if selects(selector, s["metadata"]["labels"])]
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    sidecar = container(sidecar_deployment(docs), SIDECAR)
    assert port_number(sidecar, port["targetPort"]) == ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    # Prometheus sets job from this label of the Service: the rules select that value.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB
    rules = json.dumps(one(docs, "PrometheusRule")["spec"])
    assert f'job=\\"{JOB}\\"' in rules


def test_dev_redis_refuses_to_evict_and_keeps_nothing() -> None:
    docs = render("overlays/dev")
    redis = container(one(docs, "Deployment", "admission-redis"), "redis")
    args = [str(a) for a in redis["args"]]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert one(docs, "Deployment", "admission-redis")["spec"]["replicas"] == 1
    url = base64.b64decode(one(docs, "Secret")["data"]["redis-url"]).decode()
    service = one(docs, "Service", "admission-redis")
    assert url == f"redis://admission-redis:{service['spec']['ports'][0]['port']}/0"
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        namespace["metadata"]["name"]
    }


# --- the gateways in front of the sidecar ---------------------------------------------------------


def _type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "@type":
                yield value
            else:
                yield from _type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from _type_urls(value)


def envoy_bootstrap(text: str) -> Message:
    """An Envoy config parsed into its v3 Bootstrap proto: unknown fields, wrong types and bad
    enum values raise. Each ``@type`` is resolved by importing its proto package."""
    raw = yaml.safe_load(text)
    for url in set(_type_urls(raw)):
        package = url.rpartition("/")[2].rpartition(".")[0]
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")
    bootstrap: Message = json_format.ParseDict(raw, bootstrap_pb2.Bootstrap())
    return bootstrap


def _gateway_config(docs: list[Doc], gateway: str, key: str) -> str:
    deployment = sidecar_deployment(docs)
    c = container(deployment, gateway)
    (mount,) = [m for m in c["volumeMounts"] if m["name"].endswith("-config")]
    (volume,) = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    text: str = one(docs, "ConfigMap", volume["configMap"]["name"])["data"][key]
    return text


def _filters(bootstrap: Any) -> list[str]:
    """The HTTP filter names of the first listener's connection manager, in order."""
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network,) = chain.filters
    manager = hcm.HttpConnectionManager()
    network.typed_config.Unpack(manager)
    return [f.name for f in manager.http_filters]


def _ext_authz(bootstrap: Any) -> Any:
    manager = hcm.HttpConnectionManager()
    bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    (found,) = [f for f in manager.http_filters if f.name == "envoy.filters.http.ext_authz"]
    authz = ext_authz_pb2.ExtAuthz()
    found.typed_config.Unpack(authz)
    return authz


def _cluster_address(bootstrap: Any, name: str) -> tuple[str, int]:
    (cluster,) = [c for c in bootstrap.static_resources.clusters if c.name == name]
    socket = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    return socket.address, socket.port_value


ENVOY_EXAMPLES = sorted(EXAMPLES.glob("envoy*.yaml"))


@pytest.mark.parametrize("path", ENVOY_EXAMPLES, ids=lambda p: p.name)
def test_envoy_examples_are_valid_v3_configs(path: Path) -> None:
    bootstrap: Any = envoy_bootstrap(path.read_text())
    filters = _filters(bootstrap)
    assert filters[-1] == "envoy.filters.http.router"
    assert _cluster_address(bootstrap, "admission_sidecar") == ("127.0.0.1", DATA_PORT)
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"


def test_envoy_validation_catches_a_misspelt_field() -> None:
    text = (
        (EXAMPLES / "envoy.yaml").read_text().replace("failure_mode_allow:", "failure_mode_alow:")
    )
    with pytest.raises(json_format.ParseError, match="failure_mode_alow"):
        envoy_bootstrap(text)


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-llm-d-epp.yaml"])
def test_envoy_check_outlasts_the_queue_and_fails_closed(name: str) -> None:
    bootstrap: Any = envoy_bootstrap((EXAMPLES / name).read_text())
    authz = _ext_authz(bootstrap)
    timeout = authz.http_service.server_uri.timeout.ToTimedelta().total_seconds()
    # The sidecar answers a request that waited its whole TTL (429 evicted_ttl) before Envoy
    # gives up on the check.
    assert timeout > config(render("base")).flow_control.max_request_ttl
    assert authz.failure_mode_allow is False
    assert authz.http_service.path_prefix == "/admission/v1/check"


def test_envoy_llm_d_admits_before_the_endpoint_picker() -> None:
    bootstrap: Any = envoy_bootstrap((EXAMPLES / "envoy-llm-d-epp.yaml").read_text())
    assert _filters(bootstrap) == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    (picked,) = [
        c
        for c in bootstrap.static_resources.clusters
        if c.name != "admission_sidecar" and c.original_dst_lb_config.use_http_header
    ]
    assert picked.original_dst_lb_config.http_header_name == "x-gateway-destination-endpoint"


def test_envoy_overlay_routes_to_the_sidecar() -> None:
    docs = render("overlays/beside-envoy")
    text = _gateway_config(docs, "envoy", "envoy.yaml")
    assert text == (EXAMPLES / "envoy-proxy.yaml").read_text(), "one file, two names (a symlink)"
    bootstrap: Any = envoy_bootstrap(text)
    assert _filters(bootstrap) == ["envoy.filters.http.router"]
    assert _cluster_address(bootstrap, "admission_sidecar") == ("127.0.0.1", DATA_PORT)
    (cluster,) = [c for c in bootstrap.static_resources.clusters if c.name == "admission_sidecar"]
    # Queued requests are open requests: Envoy must not cap them below the admission queue.
    (limits,) = cluster.circuit_breakers.thresholds
    assert min(limits.max_requests.value, limits.max_pending_requests.value) >= (
        config(docs).flow_control.max_requests
    )
    (listener,) = bootstrap.static_resources.listeners
    envoy = container(sidecar_deployment(docs), "envoy")
    assert listener.address.socket_address.port_value == port_number(envoy, "http")


def nginx_bin() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "nginx is not installed, and these tests run `nginx -t`: run .ci/system-deps "
            "(apt-get install nginx-light)",
            pytrace=False,
        )
    return found


def _nginx_accepts(text: str, tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        text.replace("/tmp/", f"{tmp_path}/")
        .replace("/run/nginx.pid", f"{tmp_path}/nginx.pid")
        .replace("/var/log/nginx/", f"{tmp_path}/")
    )
    done = subprocess.run(
        [nginx_bin(), "-t", "-q", "-c", str(conf), "-p", f"{tmp_path}/", "-e", f"{tmp_path}/e"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_nginx_overlay_proxies_to_the_sidecar(tmp_path: Path) -> None:
    docs = render("overlays/beside-nginx")
    text = _gateway_config(docs, "nginx", "nginx.conf")
    assert text == (EXAMPLES / "nginx-proxy.conf").read_text(), "one file, two names (a symlink)"
    assert f"server 127.0.0.1:{DATA_PORT};" in text
    nginx = container(sidecar_deployment(docs), "nginx")
    assert f"listen {port_number(nginx, 'http')};" in text
    _nginx_accepts(text, tmp_path)


@pytest.mark.parametrize("name", ["nginx.conf", "nginx-proxy.conf"])
def test_nginx_examples_are_accepted_by_nginx(name: str, tmp_path: Path) -> None:
    _nginx_accepts((EXAMPLES / name).read_text(), tmp_path)


# --- Dockerfile -----------------------------------------------------------------------------------


def _instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _final(keyword: str) -> list[str]:
    return [rest for k, rest in _stages()[-1] if k == keyword]


def dockerfile_uid() -> int:
    (user,) = _final("USER")
    return int(user.partition(":")[0])


def test_dockerfile_is_multi_stage() -> None:
    stages = _stages()
    assert len(stages) >= 2
    builder = stages[0][0][1].split()
    assert builder[-2].upper() == "AS", "the builder stage is named"
    copies = _final("COPY")
    assert any(c.startswith(f"--from={builder[-1]} ") for c in copies), "runtime copies a build"
    assert not [c for c in copies if not c.startswith("--from=")], "runtime copies source"


def test_dockerfile_runs_as_non_root() -> None:
    users = _final("USER")
    assert users, "no USER in the runtime stage"
    name = users[-1].partition(":")[0]
    assert name not in ("root", "0")
    assert dockerfile_uid() == IMAGE_UID  # numeric, so runAsNonRoot can verify it


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = _final("ENTRYPOINT")
    assert json.loads(entrypoint) == ["admission-sidecar"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "admission-sidecar" in scripts
    (cmd,) = _final("CMD")
    args = build_parser().parse_args(json.loads(cmd))
    assert args.command == "serve"
    assert args.admin_listen.endswith(f":{ADMIN_PORT}")


def test_dockerfile_runtime_settings() -> None:
    exposed = {p for line in _final("EXPOSE") for p in line.split()}
    assert {"8080", str(ADMIN_PORT)} <= exposed
    env = " ".join(_final("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for keyword, rest in _instructions():
        if keyword == "COPY" and not rest.startswith("--from="):
            *sources, _ = rest.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded from the context"
