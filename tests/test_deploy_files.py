"""The deployment files: the Kubernetes manifests under k8s/, the Dockerfile and .dockerignore.

Nothing here needs a cluster or a Docker engine. The manifests are read as data and checked against
the code they configure: the ConfigMap's config goes through ``load_config``, and each sidecar
container's args and environment go through the real ``serve`` option resolution.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.config import Config, load_config
from sidecar.options import ENV, resolve

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SIDECAR = "admission-sidecar"  # the sidecar's container name in every gateway Deployment
CONFIG_MAP = "admission-sidecar-config"
CONFIG_PATH = "/etc/admission-sidecar/config.yaml"
ADMIN_PORT = 9090
IMAGE_UID = 10001
POD_NAME = "admission-gateway-envoy-5d8c7b9f6-x2x9q"  # stands in for the fieldRef

Doc = dict[str, Any]


def _docs(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


def _manifest_paths() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def _all_docs() -> list[Doc]:
    return [doc for path in _manifest_paths() for doc in _docs(path)]


def _of_kind(kind: str) -> list[Doc]:
    return [d for d in _all_docs() if d.get("kind") == kind]


def _by_name(kind: str, name: str) -> Doc:
    found = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _pod(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def _container(deployment: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in _pod(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']}: expected one {name!r} container"
    return found[0]


def _gateway_deployments() -> list[Doc]:
    """Deployments that carry the sidecar (every one but Redis's)."""
    return [
        d
        for d in _of_kind("Deployment")
        if any(c["name"] == SIDECAR for c in _pod(d)["containers"])
    ]


def _config_text() -> str:
    text: str = _by_name("ConfigMap", CONFIG_MAP)["data"]["config.yaml"]
    return text


def _config() -> Config:
    return load_config(_config_text())


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _port(container: Doc, port: int | str) -> int:
    """A probe's port, resolving a named port against the container's ports."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: no port named {port!r}"
    return int(named[port])


def _ids(deployments: list[Doc]) -> list[str]:
    return [d["metadata"]["name"] for d in deployments]


GATEWAYS = _gateway_deployments()
gateways = pytest.mark.parametrize("deployment", GATEWAYS, ids=_ids(GATEWAYS))


# --- manifests as a whole ---------------------------------------------------------------------


def test_expected_manifests_exist() -> None:
    names = {p.name for p in _manifest_paths()}
    expected = {
        "redis.yaml",
        "configmap.yaml",
        "sidecar-envoy.yaml",
        "sidecar-nginx.yaml",
        "service.yaml",
    }
    assert expected <= names
    assert (K8S / "kustomization.yaml").is_file()
    assert _of_kind("PodDisruptionBudget"), "no PodDisruptionBudget"
    assert len(GATEWAYS) >= 2, "expected an Envoy and an nginx gateway Deployment"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_manifest_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion/kind missing"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{path.name}: a {doc['kind']} has no name"


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in _manifest_paths()}


def test_names_are_unique_per_kind() -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in _all_docs()]
    assert len(keys) == len(set(keys))


def test_configmap_holds_a_valid_config() -> None:
    config = _config()  # the real schema: unknown keys and bad values raise ConfigError
    assert config.server.shutdown_grace_period > 0
    assert config.redis.url is None, "the Redis URL belongs in REDIS_URL, not in the ConfigMap"


def test_every_container_runs_as_non_root_with_limits() -> None:
    for deployment in _of_kind("Deployment"):
        pod = _pod(deployment)
        pod_ctx = pod.get("securityContext", {})
        for c in pod["containers"]:
            where = f"{deployment['metadata']['name']}/{c['name']}"
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            resources = c.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: resources"


def test_redis_refuses_to_evict() -> None:
    redis = _container(_by_name("Deployment", "admission-redis"), "redis")
    args = [str(a) for a in redis["args"]]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_services_and_budgets_select_gateway_pods() -> None:
    def selects(selector: dict[str, str], deployment: Doc) -> bool:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in selector.items())

    deployments = _of_kind("Deployment")
    for service in _of_kind("Service"):
        name = service["metadata"]["name"]
        matched = [d for d in deployments if selects(service["spec"]["selector"], d)]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} Deployments"
        ports = {
            p.get("name"): p["containerPort"]
            for c in _pod(matched[0])["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{name}: port {target}"
            assert target not in ("admin", ADMIN_PORT), f"{name} exposes the admin port"
    for pdb in _of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [d for d in GATEWAYS if selects(selector, d)], pdb["metadata"]["name"]
    for gateway in GATEWAYS:
        budgets = _of_kind("PodDisruptionBudget")
        assert any(selects(b["spec"]["selector"]["matchLabels"], gateway) for b in budgets)


# --- the sidecar container of each gateway Deployment -------------------------------------------


@gateways
def test_sidecar_env(deployment: Doc) -> None:
    env = _env(_container(deployment, SIDECAR))
    redis_service = _by_name("Service", "admission-redis")
    redis_port = redis_service["spec"]["ports"][0]["port"]
    assert env["REDIS_URL"]["value"] == f"redis://admission-redis:{redis_port}/0"
    assert env["SIDECAR_UPSTREAM"]["value"].startswith("http://")
    assert env["SIDECAR_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SIDECAR_CONFIG"]["value"] == CONFIG_PATH


@gateways
def test_sidecar_config_is_mounted(deployment: Doc) -> None:
    sidecar = _container(deployment, SIDECAR)
    directory, _, key = CONFIG_PATH.rpartition("/")
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in _pod(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == CONFIG_MAP
    assert key in _by_name("ConfigMap", CONFIG_MAP)["data"]


@gateways
def test_sidecar_probes(deployment: Doc) -> None:
    sidecar = _container(deployment, SIDECAR)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(sidecar, get["port"]) == ADMIN_PORT, probe


@gateways
def test_sidecar_security(deployment: Doc) -> None:
    pod = _pod(deployment)
    ctx = {**pod.get("securityContext", {}), **_container(deployment, SIDECAR)["securityContext"]}
    assert ctx["runAsNonRoot"] is True
    assert ctx.get("runAsUser", IMAGE_UID) == IMAGE_UID == _dockerfile_uid()
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]


@gateways
def test_grace_period_outlasts_the_drain(deployment: Doc) -> None:
    grace = _pod(deployment)["terminationGracePeriodSeconds"]
    assert grace > _config().server.shutdown_grace_period


@gateways
def test_prometheus_scrapes_the_admin_port(deployment: Doc) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@gateways
def test_args_and_env_resolve_to_the_intended_settings(deployment: Doc, tmp_path: Path) -> None:
    """The container's args through the real CLI parser and option resolution."""
    sidecar = _container(deployment, SIDECAR)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(_config_text())
    env = {name: e["value"] for name, e in _env(sidecar).items() if "value" in e}
    env["SIDECAR_CONFIG"] = str(config_file)
    env["SIDECAR_REPLICA_ID"] = POD_NAME
    assert set(_env(sidecar)) <= set(ENV.values()), "an env var the sidecar does not read"
    args = build_parser().parse_args(sidecar.get("args", []))
    assert args.command == "serve"
    options = resolve(args, env)
    # Probes and Prometheus reach the admin port on the pod IP; only the gateway reaches the data
    # port, on loopback.
    assert options.admin_listen == ("0.0.0.0", ADMIN_PORT)
    assert options.listen[0] == "127.0.0.1"
    assert options.redis_url == env["REDIS_URL"]
    assert options.upstream == env["SIDECAR_UPSTREAM"].rstrip("/")
    assert options.replica_id.startswith(f"{POD_NAME}-")
    assert options.config == _config()


# --- the gateways in front of the sidecar ---------------------------------------------------------


def _sidecar_listen_port(deployment: Doc) -> int:
    args = build_parser().parse_args(_container(deployment, SIDECAR)["args"])
    return int(args.listen.rpartition(":")[2])


def _gateway_config(deployment: Doc, container: str, key: str) -> str:
    gateway = _container(deployment, container)
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"].endswith("-config")]
    (volume,) = [v for v in _pod(deployment)["volumes"] if v["name"] == mount["name"]]
    text: str = _by_name("ConfigMap", volume["configMap"]["name"])["data"][key]
    return text


def test_envoy_forwards_to_the_sidecar() -> None:
    deployment = _by_name("Deployment", "admission-gateway-envoy")
    envoy = yaml.safe_load(_gateway_config(deployment, "envoy", "envoy.yaml"))
    (cluster,) = [
        c for c in envoy["static_resources"]["clusters"] if c["name"] == "admission_sidecar"
    ]
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    socket = endpoint["endpoint"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"]) == (
        "127.0.0.1",
        _sidecar_listen_port(deployment),
    )
    # Queued requests are open requests: Envoy must not cap them below the admission queue.
    (limits,) = cluster["circuit_breakers"]["thresholds"]
    assert min(limits["max_requests"], limits["max_pending_requests"]) >= (
        _config().flow_control.max_requests
    )
    (listener,) = envoy["static_resources"]["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    assert port == _port(_container(deployment, "envoy"), "http")


def _nginx_conf(tmp_path: Path) -> Path:
    deployment = _by_name("Deployment", "admission-gateway-nginx")
    text = _gateway_config(deployment, "nginx", "nginx.conf")
    assert f"server 127.0.0.1:{_sidecar_listen_port(deployment)};" in text
    assert f"listen {_port(_container(deployment, 'nginx'), 'http')};" in text
    conf = tmp_path / "nginx.conf"
    conf.write_text(text.replace("/tmp/", f"{tmp_path}/"))
    return conf


def test_nginx_forwards_to_the_sidecar(tmp_path: Path) -> None:
    _nginx_conf(tmp_path)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    conf = _nginx_conf(tmp_path)
    nginx = shutil.which("nginx")
    assert nginx is not None
    done = subprocess.run(
        [nginx, "-t", "-q", "-c", str(conf), "-p", f"{tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


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


def _dockerfile_uid() -> int:
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
    assert _dockerfile_uid() == IMAGE_UID  # numeric, so runAsNonRoot can verify it


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
