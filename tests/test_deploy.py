"""The deployment files, checked without a Docker engine or a cluster.

docker-compose.yml against the vendored Compose Specification schema, deploy/Dockerfile with
hadolint, and deploy/kubernetes rendered by `kubectl kustomize` and validated against the
Kubernetes schemas (kubernetes-validate) and the vendored ServiceMonitor CRD schema. The config
files each deployment ships are loaded with the proxy's own loader. A missing kubectl or hadolint
fails these tests: CI must have both.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click import Context

from proxy.assignment import bucket, choose_variant, threshold
from proxy.cli import main as cli
from proxy.config import Settings, load_settings, settings_from_dict
from proxy.store.db import normalise_url
from proxy.traffic import TRUTH

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "deploy" / "schemas"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes minor the manifests promise to work on
SECRET_NAME = "abproxy-secrets"
PROXY, COLLECTOR, CONTROLLER = "abproxy", "abproxy-collector", "abproxy-controller"  # the Deployments' names
STACK = {"redis", "mock-base", "mock-finetuned", "proxy", "prometheus", "grafana", "traffic", "postgres", "collector",
         "controller"}  # fmt: skip
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# What the image holds at /app/config (Dockerfile: WORKDIR /app, COPY config ./config).
IMAGE_CONFIG_DIR = "/app/config/"


def _tool(name: str) -> str:
    """The venv's copy of a CLI tool, else the one on PATH; a missing tool fails the test."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in {local.parent} or on PATH: install it (pip install -e '.[test]'; "
                    "kubectl from https://kubernetes.io/docs/tasks/tools/) to validate the deployment files")
    return found


def _fake_env(raw: dict[str, Any]) -> dict[str, str]:
    """The environment a deployment provides: every api_key_env plus the proxy's own variables."""
    env = {u["api_key_env"]: "test-key" for u in raw["upstreams"].values() if u.get("api_key_env")}
    return env | {"REDIS_URL": "redis://redis:6379/0", "ABPROXY_ADMIN_TOKEN": "t", "ABPROXY_USER_HASH_KEY": "k"}


def _config_arg(args: list[str]) -> str:
    assert "--config" in args, f"no --config in {args}"
    return args[args.index("--config") + 1]


def _check_outcomes(settings: Settings) -> None:
    """The shipped outcome metrics are the ones `abproxy traffic --feedback` posts, and the plan uses them."""
    for name, simulated in TRUTH.items():
        metric = settings.metrics.get(name)
        assert metric is not None, f"metric {name} is not declared"
        assert metric.level == "request"
        if simulated.sd is None:
            assert metric.type == "boolean"
        else:
            assert metric.type == "float" and metric.min == simulated.low and metric.max == simulated.high
        # The simulated treatment is truly better: its truth moves in the declared direction.
        assert (simulated.treatment > simulated.control) == metric.higher_is_better, name
    analysis = settings.experiments["sales-companion"].analysis
    assert analysis.primary_metric == "task_completed"
    assert set(analysis.secondary_metrics) == {"csat", "escalated"}
    assert analysis.mde == 0.05
    assert settings.events.redis_stream.enabled


# -- docker compose --------------------------------------------------------------------------
@functools.cache
def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


def _binds(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    binds = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                binds.append((source, target))
        elif volume.get("type") == "bind":
            binds.append((volume["source"], volume["target"]))
    return binds


def _interpolated(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default, as with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _host_config(service: dict[str, Any]) -> Path:
    """The repository file a compose service's --config names (the image copies config/ to /app/config)."""
    path = _config_arg(service["command"])
    assert path.startswith(IMAGE_CONFIG_DIR), f"{path} is not a file the image copies from config/"
    return ROOT / "config" / path.removeprefix(IMAGE_CONFIG_DIR)


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where in the repository a path inside a compose container comes from, if it is bind-mounted."""
    for source, target in _binds(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return ROOT / source / container_path.removeprefix(target).lstrip("/")
    return None


class TestCompose:
    def test_validates_against_the_compose_spec(self) -> None:
        """docker-compose.yml is valid under the vendored Compose Specification schema."""
        schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
        # It declares draft-07 by a URL without the trailing "#", which jsonschema does not recognise.
        errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(_compose())]
        assert not errors, "\n".join(errors)

    def test_runs_the_whole_stack(self) -> None:
        """Redis, both mocks, the proxy, Prometheus, Grafana and the traffic generator are services."""
        assert set(_compose()["services"]) >= STACK

    def test_bind_mounted_paths_exist(self) -> None:
        """Every host path compose bind-mounts exists in the repository."""
        missing = [f"{name}: {source}" for name, service in _compose()["services"].items()
                   for source, _ in _binds(service) if not (ROOT / source).exists()]
        assert not missing, f"bind-mounted paths missing from the repo: {missing}"

    def test_grafana_home_dashboard_is_mounted(self) -> None:
        """Grafana's home dashboard is a file bind-mounted from the repository, so it shows at once."""
        grafana = _compose()["services"]["grafana"]
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        host = _host_path(grafana, home)
        assert host is not None and host.is_file(), f"{home} is not a repository file mounted into grafana"
        assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"

    def test_proxy_config_loads(self) -> None:
        """The config file the compose proxy runs with passes the proxy's own validation, outcome metrics included."""
        host_path = _host_config(_compose()["services"]["proxy"])
        settings = load_settings(host_path, _fake_env(yaml.safe_load(host_path.read_text())))
        assert settings.server.port == 8080
        assert settings.server.metrics_port == 9091  # deploy/prometheus/prometheus.yml scrapes proxy:9091
        _check_outcomes(settings)

    def test_collector_writes_to_postgres(self) -> None:
        """The collector runs the proxy's config on Redis and PostgreSQL, started once both are healthy."""
        services = _compose()["services"]
        collector, postgres = services["collector"], services["postgres"]
        assert collector["command"][0] == "collect"
        assert _host_config(collector) == _host_config(services["proxy"])
        assert collector["environment"]["REDIS_URL"] == services["proxy"]["environment"]["REDIS_URL"]
        assert collector["depends_on"] == {"redis": {"condition": "service_healthy"},
                                           "postgres": {"condition": "service_healthy"}}
        assert collector["restart"] == "unless-stopped"
        # The image's HEALTHCHECK probes an HTTP port the collector does not open.
        assert collector["healthcheck"] == {"disable": True}
        assert postgres["image"].startswith("postgres:")
        assert "pg_isready" in postgres["healthcheck"]["test"]
        (volume,) = postgres["volumes"]
        assert volume.split(":")[0] in _compose()["volumes"], "postgres data is not on a named volume"

    def test_store_url_names_the_postgres_service(self) -> None:
        """Collector and proxy share one store URL: the postgres service, its user, password and database."""
        services = _compose()["services"]
        db = {key: _interpolated(value) for key, value in services["postgres"]["environment"].items()}
        url = services["collector"]["environment"]["ABPROXY_STORE_URL"]
        assert services["proxy"]["environment"]["ABPROXY_STORE_URL"] == url
        parsed = normalise_url(_interpolated(url))
        assert parsed.drivername == "postgresql+psycopg"
        assert (parsed.host, parsed.port) == ("postgres", 5432)
        assert (parsed.username, parsed.password, parsed.database) == (
            db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], db["POSTGRES_DB"])
        # The config's own store.url (used without the variable) is the same URL.
        config_url = load_settings(_host_config(services["proxy"]), {}, upstream_keys=False).store.url
        assert normalise_url(config_url) == parsed

    def test_proxy_signs_request_ids(self) -> None:
        """The proxy has a signing key (feedback checks request ids by it) and the user hash key."""
        env = _compose()["services"]["proxy"]["environment"]
        assert _interpolated(env["ABPROXY_SIGNING_KEY"]) and _interpolated(env["ABPROXY_USER_HASH_KEY"])

    def test_traffic_reports_outcomes(self) -> None:
        """The traffic generator posts simulated feedback, so the stack's report has outcomes to analyse."""
        assert "--feedback" in _compose()["services"]["traffic"]["command"]

    def test_controller_drives_the_demo_plan(self) -> None:
        """The controller runs the proxy's config, which has a rollout plan (without one it exits), on Redis
        and the store, and serves the metrics port Prometheus scrapes as job abproxy-controller."""
        services = _compose()["services"]
        controller = services["controller"]
        command, args = controller["command"][0], controller["command"][1:]
        assert command == "controller" and "--once" not in args
        assert _host_config(controller) == _host_config(services["proxy"])
        settings = load_settings(_host_config(controller), {}, upstream_keys=False)
        plan = settings.experiments["sales-companion"].rollout_plan
        assert plan and plan[0].gates, "the demo plan must start with a gated phase"
        assert settings.experiments["sales-companion"].rollout_percent == 0  # the plan's start sets the percent
        assert controller["environment"]["REDIS_URL"] == services["proxy"]["environment"]["REDIS_URL"]
        store_url = services["collector"]["environment"]["ABPROXY_STORE_URL"]
        assert controller["environment"]["ABPROXY_STORE_URL"] == store_url
        assert controller["depends_on"] == services["collector"]["depends_on"]
        assert controller["restart"] == "unless-stopped"
        port = args[args.index("--metrics-port") + 1]
        assert f"127.0.0.1:{port}/metrics" in " ".join(controller["healthcheck"]["test"])
        jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
        assert jobs["abproxy-controller"]["static_configs"] == [{"targets": [f"controller:{port}"]}]

    def test_demo_plan_can_pass_its_user_minimums(self) -> None:
        """Each phase's min_users_per_variant is within reach of the traffic generator's user pool (ids user-0 ..
        user-N-1, assigned by the public hash): a minimum above it would hold the demo plan for ever."""
        traffic = _compose()["services"]["traffic"]["command"]
        users = int(traffic[traffic.index("--users") + 1])
        settings = load_settings(_host_config(_compose()["services"]["controller"]), {}, upstream_keys=False)
        experiment = settings.experiments["sales-companion"]
        for phase in experiment.rollout_plan:
            treated = sum(choose_variant(bucket(experiment.salt, f"user-{i}"), threshold(phase.percent)) == "treatment"
                          for i in range(users))  # fmt: skip
            assert phase.min_users_per_variant <= min(treated, users - treated), (phase.name, treated)

    def test_nothing_else_sets_the_percent(self) -> None:
        """With a plan in the config, the traffic generator does not ramp the rollout: a percent set through
        the admin API would pause the plan."""
        traffic = _compose()["services"]["traffic"]["command"]
        assert not {"--ramp", "--ramp-every", "--admin-url"} & set(traffic)

    def test_abproxy_commands_parse(self) -> None:
        """Each service built from the image runs an abproxy command whose options the CLI accepts."""
        built = {name: s for name, s in _compose()["services"].items() if "build" in s}
        assert set(built) >= {"proxy", "mock-base", "mock-finetuned", "traffic", "collector", "controller"}
        for name, service in built.items():
            command, *args = service["command"]
            assert command in cli.commands, f"{name}: abproxy has no command {command!r}"
            with Context(cli, info_name="abproxy") as parent:
                cli.commands[command].make_context(command, list(args), parent=parent)

    def test_health_gated_dependencies_have_healthchecks(self) -> None:
        """A service others wait on with condition service_healthy defines a healthcheck."""
        services = _compose()["services"]
        for name, service in services.items():
            for dep, cond in service.get("depends_on", {}).items():
                assert dep in services, f"{name} depends on unknown service {dep}"
                if cond.get("condition") == "service_healthy":
                    check = services[dep].get("healthcheck", {})
                    assert check.get("test") and not check.get("disable"), f"{name} waits on {dep}'s health"
        assert services["proxy"]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services["traffic"]["depends_on"]["proxy"]["condition"] == "service_healthy"
        assert services["collector"]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services["controller"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    def test_third_party_images_are_pinned(self) -> None:
        """Images pulled from a registry name an explicit tag, never latest."""
        for name, service in _compose()["services"].items():
            if "build" in service:
                continue
            image = service["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"
            assert tag != "latest", f"{name}: pin a tag for {image}"


# -- Dockerfile ------------------------------------------------------------------------------
def _final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


class TestDockerfile:
    def test_hadolint_clean(self) -> None:
        """hadolint reports nothing, down to style level."""
        result = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_runs_as_non_root_with_a_healthcheck(self) -> None:
        """The image runs as a numeric non-root UID, probes /healthz, and exposes 8080 and 9091."""
        stage = _final_stage()
        users = [args for op, args in stage if op == "USER"]
        assert users, "the final stage has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} is not a numeric non-root UID"
        checks = [args for op, args in stage if op == "HEALTHCHECK"]
        assert checks and "/healthz" in checks[-1], "no HEALTHCHECK against /healthz"
        exposed = {port for op, args in stage if op == "EXPOSE" for port in args.split()}
        assert exposed >= {"8080", "9091"}


# -- Kubernetes ------------------------------------------------------------------------------
@functools.cache
def _rendered_cached() -> tuple[dict[str, Any], ...]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(KUSTOMIZE_DIR)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _rendered() -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered_cached()))


def _one(kind: str) -> dict[str, Any]:
    docs = [doc for doc in _rendered() if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind}, rendered {len(docs)}"
    return docs[0]


def _service(name: str = PROXY) -> dict[str, Any]:
    docs = [doc for doc in _rendered() if doc["kind"] == "Service" and doc["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one Service {name}, rendered {len(docs)}"
    return docs[0]


def _deployment(name: str = PROXY) -> dict[str, Any]:
    docs = [doc for doc in _rendered() if doc["kind"] == "Deployment" and doc["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one Deployment {name}, rendered {len(docs)}"
    return docs[0]


def _pod(name: str = PROXY) -> dict[str, Any]:
    pod: dict[str, Any] = _deployment(name)["spec"]["template"]["spec"]
    return pod


def _container(name: str = PROXY) -> dict[str, Any]:
    containers = _pod(name)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    """{variable: key} of the container's env entries taken from abproxy-secrets."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET_NAME}


def _port(container: dict[str, Any], ref: int | str) -> int:
    """A probe's or Service's port reference resolved to the container port number."""
    if isinstance(ref, int):
        return ref
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ref in ports, f"no container port named {ref!r}"
    return ports[ref]


def _deployed_settings() -> Settings:
    raw = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])
    return settings_from_dict(raw, _fake_env(raw))


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as kubectl's strict field validation does.

    A structural CRD schema leaves additionalProperties unset and the API server prunes unknown
    fields, so a misspelt key would vanish silently; in these tests it is an error instead.
    """
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class TestKubernetes:
    def test_renders_the_expected_objects(self) -> None:
        """kubectl kustomize renders exactly the proxy's, the collector's and the controller's objects, and no
        Secret."""
        kinds = sorted(doc["kind"] for doc in _rendered())
        assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                                "PodDisruptionBudget", "Service", "Service", "Service", "ServiceMonitor"])
        deployments = {doc["metadata"]["name"] for doc in _rendered() if doc["kind"] == "Deployment"}
        assert deployments == {PROXY, COLLECTOR, CONTROLLER}
        services = {doc["metadata"]["name"] for doc in _rendered() if doc["kind"] == "Service"}
        assert services == {PROXY, CONTROLLER, COLLECTOR}

    def test_builtin_kinds_validate_strictly(self) -> None:
        """Every built-in object validates against the Kubernetes schemas, unknown fields refused."""
        for doc in _rendered():
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")

    def test_servicemonitor_validates_against_the_crd(self) -> None:
        """The ServiceMonitor is valid under the vendored prometheus-operator CRD schema."""
        schema = _closed(json.loads((SCHEMAS / "servicemonitor.json").read_text()))
        monitor = _one("ServiceMonitor")
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(monitor)]
        assert not errors, "\n".join(errors)

    def test_servicemonitor_scrapes_the_metrics_port(self) -> None:
        """The ServiceMonitor selects the Service and scrapes its port named metrics, which is 9091."""
        monitor, service = _one("ServiceMonitor"), _service()
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["metrics"]["port"] == 9091
        assert _port(_container(), ports["metrics"]["targetPort"]) == 9091
        assert ports["http"]["port"] == 8080
        assert _port(_container(), ports["http"]["targetPort"]) == 8080

    def test_probes(self) -> None:
        """Readiness is /readyz and liveness /healthz, both on the proxy's port 8080."""
        container = _container()
        readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert readiness["path"] == "/readyz"
        assert liveness["path"] == "/healthz"
        assert _port(container, readiness["port"]) == _port(container, liveness["port"]) == 8080

    def test_secrets_come_from_the_secret(self) -> None:
        """REDIS_URL, the admin token, the hash and signing keys, the store URL and every api_key_env come
        from abproxy-secrets."""
        container = _container()
        from_secret = set(_secret_env(container))
        whole_secret = any(src.get("secretRef", {}).get("name") == SECRET_NAME for src in container.get("envFrom", []))
        literal = {e["name"] for e in container.get("env", []) if "value" in e}
        raw = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])
        needed = {"REDIS_URL", "ABPROXY_ADMIN_TOKEN", "ABPROXY_USER_HASH_KEY", "ABPROXY_SIGNING_KEY",
                  "ABPROXY_STORE_URL"}
        needed |= {u["api_key_env"] for u in raw["upstreams"].values() if u.get("api_key_env")}
        assert not needed & literal, f"secrets given as literal values: {needed & literal}"
        assert whole_secret or needed <= from_secret, f"not taken from {SECRET_NAME}: {needed - from_secret}"

    def test_secret_example_matches_the_deployment(self) -> None:
        """secret.example.yaml is a valid Secret holding every key the Deployments read, and is not applied."""
        kustomization = yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())
        assert "secret.example.yaml" not in kustomization["resources"]
        secret = yaml.safe_load((KUSTOMIZE_DIR / "secret.example.yaml").read_text())
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert secret["metadata"]["name"] == SECRET_NAME
        read = {key for name in (PROXY, COLLECTOR, CONTROLLER) for key in _secret_env(_container(name)).values()}
        assert read <= set(secret["stringData"]), f"missing from the example: {read - set(secret['stringData'])}"

    def test_config_comes_from_the_generated_configmap(self) -> None:
        """The proxy's, the collector's and the controller's pods mount the generated (hash-suffixed) ConfigMap where
        --config points."""
        configmap = _one("ConfigMap")
        assert configmap["metadata"]["name"].startswith("abproxy-config-")  # the generator's hash suffix
        for name in (PROXY, COLLECTOR, CONTROLLER):
            container = _container(name)
            volumes = {v["name"]: v for v in _pod(name)["volumes"]}
            config_path = Path(_config_arg(container["args"]))
            mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
            assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"], name
            assert config_path.name in configmap["data"], name

    def test_configmap_config_loads(self) -> None:
        """The shipped config passes the proxy's validation and matches the pod's ports, one worker per pod,
        outcome metrics and the analysis plan included."""
        settings = _deployed_settings()
        container = _container()
        assert _port(container, "http") == settings.server.port
        assert _port(container, "metrics") == settings.server.metrics_port == 9091
        assert settings.server.workers == 1
        _check_outcomes(settings)

    def test_runs_non_root_on_a_read_only_root(self) -> None:
        """Proxy, collector and controller: non-root with the image's UID, read-only root filesystem, /tmp an
        emptyDir."""
        image_uid = [args for op, args in _final_stage() if op == "USER"][-1].split(":")[0]
        for name in (PROXY, COLLECTOR, CONTROLLER):
            pod, container = _pod(name), _container(name)
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == int(image_uid)
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[tmp["name"]]

    def test_hpa_and_pdb_target_the_deployment(self) -> None:
        """The HPA scales the Deployment on CPU; the PDB keeps one of its pods."""
        deployment, hpa, pdb = _deployment(), _one("HorizontalPodAutoscaler"), _one("PodDisruptionBudget")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        assert _matches(_service()["spec"]["selector"], pod_labels)

    def test_collector_writes_the_store_from_the_secret(self) -> None:
        """The collector runs `abproxy collect` on the shared config, REDIS_URL and the store URL from the Secret."""
        deployment, container = _deployment(COLLECTOR), _container(COLLECTOR)
        assert container["args"][0] == "collect"
        assert _config_arg(container["args"]) == _config_arg(_container()["args"])
        assert container["image"] == _container()["image"]
        assert _secret_env(container) == {"REDIS_URL": "REDIS_URL", "ABPROXY_STORE_URL": "ABPROXY_STORE_URL"}
        assert not [e for e in container.get("env", []) if "value" in e], "literal values in the collector's env"
        assert deployment["spec"]["replicas"] == 1
        # A consumer: nothing to serve or probe but its metrics, behind the headless Service the
        # ServiceMonitor selects as job abproxy-collector (the alert rules' job).
        args = container["args"]
        port = int(args[args.index("--metrics-port") + 1])
        assert [p["name"] for p in container["ports"]] == ["metrics"] and _port(container, "metrics") == port
        assert "readinessProbe" not in container and "livenessProbe" not in container
        service = _service(COLLECTOR)
        assert service["spec"]["clusterIP"] == "None"
        (service_port,) = service["spec"]["ports"]
        assert service_port["name"] == "metrics" and _port(container, service_port["targetPort"]) == port
        assert _matches(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        assert _matches(_one("ServiceMonitor")["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        rules = (ROOT / "deploy" / "prometheus" / "rules" / "abproxy.rules.yml").read_text()
        assert f'job="{service["metadata"]["name"]}"' in rules

    def test_collector_pods_stay_out_of_the_proxys_objects(self) -> None:
        """Neither the Service, the PDB nor the proxy's selector picks up a collector pod."""
        collector_labels = _deployment(COLLECTOR)["spec"]["template"]["metadata"]["labels"]
        proxy_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
        assert _matches(_deployment(COLLECTOR)["spec"]["selector"]["matchLabels"], collector_labels)
        for name, selector in (("Service", _service()["spec"]["selector"]),
                               ("PodDisruptionBudget", _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
                               ("proxy Deployment", _deployment()["spec"]["selector"]["matchLabels"])):
            assert not _matches(selector, collector_labels), f"the {name} selects collector pods"
        assert not _matches(_deployment(COLLECTOR)["spec"]["selector"]["matchLabels"], proxy_labels)

    def test_controller_drives_the_plan_from_the_secret(self) -> None:
        """The controller runs `abproxy controller` (not --once) on the shared config, which has a rollout plan,
        with Redis and the store from the Secret; 2 replicas, since only the lease holder acts."""
        deployment, container = _deployment(CONTROLLER), _container(CONTROLLER)
        args = container["args"]
        assert args[0] == "controller" and "--once" not in args
        assert _config_arg(args) == _config_arg(_container()["args"])
        assert container["image"] == _container()["image"]
        from_secret = _secret_env(container)
        assert {"REDIS_URL": "REDIS_URL", "ABPROXY_STORE_URL": "ABPROXY_STORE_URL"}.items() <= from_secret.items()
        assert not [e for e in container.get("env", []) if "value" in e], "literal values in the controller's env"
        assert deployment["spec"]["replicas"] == 2
        assert _deployed_settings().experiments["sales-companion"].rollout_plan, "without a plan the controller exits"
        assert {"requests", "limits"} <= set(container["resources"])

    def test_controller_metrics_are_scraped_and_probed(self) -> None:
        """--metrics-port is the container's port `metrics`, probed over TCP and behind the headless Service
        abproxy-controller (the alert rules' job), which the ServiceMonitor selects."""
        container, service = _container(CONTROLLER), _service(CONTROLLER)
        args = container["args"]
        port = int(args[args.index("--metrics-port") + 1])
        assert _port(container, "metrics") == port
        for probe in ("readinessProbe", "livenessProbe"):
            assert _port(container, container[probe]["tcpSocket"]["port"]) == port, probe
        assert service["spec"]["clusterIP"] == "None"
        (service_port,) = service["spec"]["ports"]
        assert service_port["name"] == "metrics" and _port(container, service_port["targetPort"]) == port
        assert _matches(service["spec"]["selector"], _deployment(CONTROLLER)["spec"]["template"]["metadata"]["labels"])
        monitor = _one("ServiceMonitor")
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert "metrics" in [e["port"] for e in monitor["spec"]["endpoints"]]
        rules = (ROOT / "deploy" / "prometheus" / "rules" / "abproxy.rules.yml").read_text()
        assert f'job="{service["metadata"]["name"]}"' in rules

    def test_controller_pods_stay_apart(self) -> None:
        """Controller pods are selected by their own Deployment and Service only, and select no other pod."""
        controller = _deployment(CONTROLLER)
        labels = controller["spec"]["template"]["metadata"]["labels"]
        for name, selector in (("Service", _service()["spec"]["selector"]),
                               ("PodDisruptionBudget", _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
                               ("proxy Deployment", _deployment()["spec"]["selector"]["matchLabels"]),
                               ("collector Deployment", _deployment(COLLECTOR)["spec"]["selector"]["matchLabels"])):
            assert not _matches(selector, labels), f"the {name} selects controller pods"
        for other in (PROXY, COLLECTOR):
            other_labels = _deployment(other)["spec"]["template"]["metadata"]["labels"]
            assert not _matches(controller["spec"]["selector"]["matchLabels"], other_labels)
            assert not _matches(_service(CONTROLLER)["spec"]["selector"], other_labels)
