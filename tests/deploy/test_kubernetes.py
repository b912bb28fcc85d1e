"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, every object is valid
against the Kubernetes schemas (kubernetes-validate, offline), and the manifests set only
settings that exist, with values `Settings` accepts.

Custom resources (ServiceMonitor, PrometheusRule) are not in kubernetes-validate's schemas:
their apiVersion, kind and required fields are checked here by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from backend.config import SECTIONS, Settings, _Section

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("overlays/dev", "overlays/prod", "overlays/prod/migrate")
KUBERNETES_VERSION = "1.32.0"  # the clusters these manifests target (kubectl here is v1.32)
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with Kustomize) not installed")

_rendered: dict[str, list[dict[str, Any]]] = {}


def render(directory: str | Path) -> list[dict[str, Any]]:
    key = str(directory)
    if key not in _rendered:
        assert KUBECTL is not None
        done = subprocess.run(
            [KUBECTL, "kustomize", str(KUBERNETES / directory)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        _rendered[key] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return _rendered[key]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in of_kind(objects, kind)])
    return found[0]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def setting_variables() -> set[str]:
    """Every environment variable `Settings` reads, as the README's table names them, and the
    `<VARIABLE>_FILE` form each one also accepts."""
    names: set[str] = set()
    for section in SECTIONS:
        prefix = str(section.model_config.get("env_prefix", ""))
        for name, field in section.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
                continue
            names.add(f"{prefix}{name.upper()}")
    return names | {f"{name}_FILE" for name in names}


# -- Rendering and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_is_valid(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    assert objects
    for obj in objects:
        where = f"{overlay}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_prometheus_operator_resource(obj, where)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")
        assert obj["metadata"].get("namespace"), f"{where}: no namespace"  # none cluster-wide


def _check_prometheus_operator_resource(obj: dict[str, Any], where: str) -> None:
    """The CRDs' required fields (monitoring.coreos.com/v1), checked structurally."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
    assert obj["metadata"].get("name"), where
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert isinstance(spec["selector"], dict), where
        assert spec["selector"], where
        endpoints = spec["endpoints"]
        assert endpoints, where
        for endpoint in endpoints:
            assert endpoint.get("port") or endpoint.get("targetPort"), where
            assert set(endpoint) <= {
                "port",
                "targetPort",
                "path",
                "interval",
                "scrapeTimeout",
                "scheme",
                "honorLabels",
                "relabelings",
                "metricRelabelings",
            }, where
    elif obj["kind"] == "PrometheusRule":
        for group in spec["groups"]:
            assert group["name"], where
            assert group["rules"], where
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), (where, rule)
                assert str(rule["expr"]).strip(), where
    else:
        pytest.fail(f"{where}: unexpected custom resource")


def test_the_schema_check_can_fail() -> None:
    """The validation above is not vacuous: an unknown field and a wrong type are refused."""
    import kubernetes_validate

    deployment = one(render("overlays/prod"), "Deployment", "sightline-api")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- Settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_sightline_variable_is_a_setting(overlay: str) -> None:
    known = setting_variables()
    for obj in render(overlay):
        for container in containers(obj):
            unknown = {n for n in env_of(container) if n.startswith("SIGHTLINE_")} - known
            assert not unknown, f"{obj['kind']}/{obj['metadata']['name']}: {sorted(unknown)}"


def test_the_settings_check_knows_the_variables() -> None:
    known = setting_variables()
    assert {"SIGHTLINE_ENV", "SIGHTLINE_DATA_DIR", "SIGHTLINE_SERVER_GRACEFUL_SHUTDOWN_S"} <= known
    assert "SIGHTLINE_DATABASE_URL_FILE" in known
    assert "SIGHTLINE_SERVER_GRACEFULL_SHUTDOWN_S" not in known  # a typo would be caught
    assert "SIGHTLINE_SERVER" not in known  # a section is not a variable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_accept_the_manifest_values(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each container's environment loads as `Settings` (production refuses a missing URL or a
    weak key): the `_FILE` paths point at stand-in files holding valid values."""
    stand_ins = {
        "SIGHTLINE_DATABASE_URL_FILE": "postgresql://sightline:x@sightline-postgres:5432/sightline",
        "SIGHTLINE_REDIS_URL_FILE": "redis://sightline-redis:6379/0",
        "SIGHTLINE_SECURITY_SECRET_KEY_FILE": "k" * 48,
    }
    for obj in render(overlay):
        for container in containers(obj):
            env = env_of(container)
            if obj["metadata"]["name"] == "sightline-inference":
                continue  # no database, no secret: test_inference_settings_load
            for name in list(os.environ):
                if name.startswith("SIGHTLINE_"):
                    monkeypatch.delenv(name)
            for name, value in env.items():
                if name in stand_ins:
                    assert value.startswith("/run/secrets/"), (name, value)
                    path = tmp_path / name
                    path.write_text(stand_ins[name], encoding="utf-8")
                monkeypatch.setenv(name, str(path) if name in stand_ins else value)
            settings = Settings()
            assert settings.env == "production"
            assert isinstance(settings.database.url, SecretStr)
            assert not settings.should_migrate_on_start  # the migrations Job does it


def test_the_settings_checks_cover_every_workload() -> None:
    """Both Deployments (the API and the inference service) and the Job set settings, and the
    checks above read each of them."""
    names = {
        obj["metadata"]["name"]
        for overlay in OVERLAYS
        for obj in render(overlay)
        for container in containers(obj)
        if any(n.startswith("SIGHTLINE_") for n in env_of(container))
    }
    assert names == {"sightline-api", "sightline-inference", "sightline-migrate"}


def test_inference_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference container's environment loads as `Settings` (no database, no secret: it
    is not a production API server) and says what the serve command binds."""
    deployment = one(render("overlays/prod"), "Deployment", "sightline-inference")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for name in list(os.environ):
        if name.startswith("SIGHTLINE_"):
            monkeypatch.delenv(name)
    for name, value in env_of(container).items():
        monkeypatch.setenv(name, value)
    vision = Settings().vision
    assert vision.serve_host == "0.0.0.0"
    assert vision.device == "cuda"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": vision.serve_http_port,
        "grpc": vision.serve_grpc_port,
        "metrics": vision.serve_metrics_port,
    }
    # the stub's environment the Dockerfile builds into the image (nothing installs in a pod)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"SIGHTLINE_VISION_SERVE_STUB_ENV={vision.serve_stub_env}" in dockerfile
    assert f"stub_environment(Path('{vision.serve_stub_env}'))" in dockerfile


def test_no_secret_values_in_the_manifests() -> None:
    """Secrets come by reference (files from an existing Secret): no Secret object is rendered
    and no variable holding a secret is set to a value."""
    secret_fields = {
        variable
        for variable in setting_variables()
        if not variable.endswith("_FILE")
        and any(word in variable for word in ("URL", "SECRET", "KEY", "PASSWORD"))
    }
    secret_fields -= {  # addresses, not secrets
        "SIGHTLINE_CHAT_LLM_BASE_URL",
        "SIGHTLINE_AUTH_OIDC_REDIRECT_URL",
        "SIGHTLINE_VISION_REMOTE_URL",
    }
    for overlay in OVERLAYS:
        objects = render(overlay)
        assert not of_kind(objects, "Secret"), overlay
        for obj in objects:
            for container in containers(obj):
                assert not set(env_of(container)) & secret_fields, obj["metadata"]["name"]


# -- The API's shape ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_api_probes_and_drain(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment", "sightline-api")
    pod = deployment["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    env = env_of(api)
    assert env["SIGHTLINE_SERVER_PORT"] == "8000" == str(api["ports"][0]["containerPort"])
    # The grace covers preStop, uvicorn's connection drain, the run drain and the inference
    # pool's worker join (each SIGHTLINE_SERVER_GRACEFUL_SHUTDOWN_S), with room to spare.
    drain = float(env["SIGHTLINE_SERVER_GRACEFUL_SHUTDOWN_S"])
    pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 3 * drain + 10
    context = api["securityContext"]
    assert context["readOnlyRootFilesystem"]
    assert not context["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"] for m in api["volumeMounts"]}
    assert {env["SIGHTLINE_DATA_DIR"], "/tmp"} <= mounts
    for name in ("SIGHTLINE_DATABASE_URL_FILE", "SIGHTLINE_REDIS_URL_FILE"):
        assert any(env[name].startswith(m + "/") for m in mounts), name
    assert api["resources"]["requests"]
    assert api["resources"]["limits"]


def test_dev_is_one_small_replica_with_its_migrations() -> None:
    objects = render("overlays/dev")
    assert one(objects, "Deployment", "sightline-api")["spec"]["replicas"] == 1
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    job = one(objects, "Job", "sightline-migrate")
    assert next(containers(job))["args"] == ["sightline", "migrate"]


def test_prod_scales_on_cpu_and_active_chat_runs() -> None:
    from backend.core.metrics import Metrics

    objects = render("overlays/prod")
    deployment = one(objects, "Deployment", "sightline-api")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    hpa = one(objects, "HorizontalPodAutoscaler", "sightline-api")
    assert hpa["spec"]["minReplicas"] == 3
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    metric = kinds["Pods"]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric in exported, metric  # the gauge the server really exports
    pdb = one(objects, "PodDisruptionBudget", "sightline-api")
    assert pdb["spec"]["minAvailable"] == 2
    assert not of_kind(objects, "Job")  # run per release: overlays/prod/migrate


def test_prod_migrations_match_the_release() -> None:
    api = one(render("overlays/prod"), "Deployment", "sightline-api")
    job = one(render("overlays/prod/migrate"), "Job", "sightline-migrate")
    assert api["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert next(containers(api))["image"] == next(containers(job))["image"]
    secret = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}["secrets"]
    job_secret = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["secrets"]
    assert secret == job_secret


def test_only_database_clients_reach_postgres_and_redis() -> None:
    for overlay in ("overlays/dev", "overlays/prod"):
        objects = render(overlay)
        policies = of_kind(objects, "NetworkPolicy")
        opening = [
            p
            for p in policies
            for rule in p["spec"].get("egress", [])
            if {port["port"] for port in rule.get("ports", [])} & {5432, 6379}
        ]
        assert len(opening) == 1
        selector = opening[0]["spec"]["podSelector"]["matchLabels"]
        clients = [
            o
            for o in objects
            if o["kind"] in ("Deployment", "Job")
            and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert {o["metadata"]["name"] for o in clients} <= {"sightline-api", "sightline-migrate"}
        deny = one(objects, "NetworkPolicy", "sightline-default-deny")
        assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in deny["spec"]
        assert "egress" not in deny["spec"]


def test_every_dashboard_is_in_the_configmap_once() -> None:
    dashboards = sorted(p.name for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    config_map = one(render("overlays/prod"), "ConfigMap", "sightline-grafana-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(config_map["data"]) == dashboards
    for name in dashboards:
        on_disk = (ROOT / "deploy" / "grafana" / "dashboards" / name).read_text(encoding="utf-8")
        assert config_map["data"][name] == on_disk
    copies = [p for p in KUBERNETES.rglob("*.json")]
    assert not copies  # one place only: deploy/grafana/dashboards


@pytest.mark.parametrize(
    ("name", "port"), [("sightline-api", "http"), ("sightline-inference", "metrics")]
)
def test_service_monitor_scrapes_the_service(name: str, port: str) -> None:
    objects = render("overlays/prod")
    monitor = one(objects, "ServiceMonitor", name)
    service = one(objects, "Service", name)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {port} <= ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_prometheus_rule_is_generated_from_the_alert_rules() -> None:
    """base/prometheusrule.yaml is deploy/prometheus/alerts.yml as the operator's resource: the
    committed file is what prometheusrule.py writes, and the rendered groups are the rules'."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prometheusrule", KUBERNETES / "prometheusrule.py"
    )
    assert spec is not None
    assert spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = (KUBERNETES / "base" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == generator.render(), "rerun python deploy/kubernetes/prometheusrule.py"
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text("utf-8"))
    rendered = one(render("overlays/prod"), "PrometheusRule", "sightline-api")
    assert rendered["spec"]["groups"] == rules["groups"]


# -- The inference service -------------------------------------------------------------------


def _served_models(container: dict[str, Any]) -> list[str]:
    args = container["args"]
    assert args[:3] == ["sightline", "inference", "serve"], args
    return [a.removeprefix("--model=") for a in args if a.startswith("--model=")]


def test_inference_serves_known_models_and_is_ready_when_they_are() -> None:
    from backend.inference.manifest import load_manifests
    from backend.inference.serve import servable

    deployment = one(render("overlays/prod"), "Deployment", "sightline-inference")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    models = _served_models(container)
    assert models
    assert [m.name for m in servable(load_manifests(None), models)] == models
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    # Triton's /v2/health/ready answers before PyTriton binds a model: the pod is ready once
    # the last model bound (the command binds them in order) is
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == f"/v2/models/{models[-1]}/ready"
    assert ready["port"] == "http"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 5 + 10  # Triton's exit timeout
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {env_of(container)["SIGHTLINE_DATA_DIR"], "/tmp", "/dev/shm"} <= mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not [v for v in volumes.values() if "secret" in v]  # it holds no secret
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "sightline.io/database-client" not in labels  # PostgreSQL and Redis stay shut


def test_prod_inference_runs_on_gpu_nodes() -> None:
    deployment = one(render("overlays/prod"), "Deployment", "sightline-inference")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert env_of(container)["SIGHTLINE_VISION_DEVICE"] == "cuda"
    assert "replicas" not in deployment["spec"]  # its HPA owns the count
    api = one(render("overlays/prod"), "Deployment", "sightline-api")
    release = next(containers(api))["image"].rsplit(":", 1)[1]
    assert container["image"].rsplit(":", 1)[1] == release  # one release, two images


def test_prod_api_calls_the_inference_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.config import VisionSettings

    objects = render("overlays/prod")
    env = env_of(next(containers(one(objects, "Deployment", "sightline-api"))))
    for name in list(os.environ):
        if name.startswith("SIGHTLINE_VISION_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("SIGHTLINE_VISION_"):
            monkeypatch.setenv(name, value)
    vision = VisionSettings()
    assert vision.backend == "remote"
    host, port = vision.remote_url.rsplit(":", 1)
    service = one(objects, "Service", host)
    http = {p["name"]: p for p in service["spec"]["ports"]}["http"]
    assert http["port"] == int(port)
    inference = one(objects, "Deployment", "sightline-inference")
    assert service["spec"]["selector"].items() <= (
        inference["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc", "metrics"}


def test_dev_keeps_the_embedded_inference_pool() -> None:
    objects = render("overlays/dev")
    assert not [o for o in objects if "inference" in o["metadata"]["name"]]
    env = env_of(next(containers(one(objects, "Deployment", "sightline-api"))))
    assert env.get("SIGHTLINE_VISION_BACKEND", "local") == "local"


def test_prod_inference_scales_on_its_queue() -> None:
    objects = render("overlays/prod")
    hpa = one(objects, "HorizontalPodAutoscaler", "sightline-inference")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sightline-inference"
    assert hpa["spec"]["minReplicas"] >= 2  # one pod drained still leaves one serving
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # per pod, from prometheus-adapter
    # Triton's queue gauge (tests/remote/test_remote.py checks the served metrics export it)
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    pdb = one(objects, "PodDisruptionBudget", "sightline-inference")
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "sightline-inference"
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_only_the_api_reaches_the_inference_service() -> None:
    """Every NetworkPolicy letting traffic into the inference pods admits the API's pods (its
    HTTP and gRPC ports) or Prometheus (its metrics port), nothing else; the API may go out to
    them; the inference pods may go nowhere but DNS."""
    objects = render("overlays/prod")
    deployment = one(objects, "Deployment", "sightline-inference")
    inference = deployment["spec"]["template"]["metadata"]["labels"]
    api = one(objects, "Deployment", "sightline-api")["spec"]["template"]["metadata"]["labels"]
    container = next(containers(deployment))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    policies = of_kind(objects, "NetworkPolicy")
    admitted: set[int] = set()
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], inference):
            continue
        for rule in policy["spec"].get("ingress", []):
            opened = {p["port"] for p in rule["ports"]}
            (peer,) = rule["from"]
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "monitoring"
                }
                assert opened == {ports["metrics"]}
            else:
                assert peer["podSelector"]["matchLabels"] == {
                    "app.kubernetes.io/name": "sightline-api"
                }
                assert _selects(peer["podSelector"], api)
                assert opened == {ports["http"], ports["grpc"]}
            admitted |= opened
        for rule in policy["spec"].get("egress", []):
            assert {p["port"] for p in rule["ports"]} == {53}, policy["metadata"]["name"]
    assert admitted == set(ports.values())
    out_to_inference = [
        rule
        for policy in policies
        if _selects(policy["spec"]["podSelector"], api)
        for rule in policy["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if _selects(peer.get("podSelector", {"matchLabels": {"-": "-"}}), inference)
    ]
    assert [{p["port"] for p in r["ports"]} for r in out_to_inference] == [
        {ports["http"], ports["grpc"]}
    ]
