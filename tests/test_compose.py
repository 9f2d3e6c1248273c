"""The docker-compose stack, its GPU override, the gateway image and the Triton model
repository: parsed and cross-checked against each other and against the files they name, and
safe to publish (pinned images, no default passwords or keys, secrets from files, no
Prometheus lifecycle API, Grafana without anonymous access). ``docker compose config`` runs
too where the compose plugin is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from gateway.core.config import GatewayConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
GATEWAY_CONFIG = ROOT / "config" / "gateway.compose.yaml"
MODELS = ROOT / "config" / "triton" / "model_repository"
OUTPUT_DIRS = {"./results"}  # written by the stack (git-ignored); docker creates it
SECRETS_DIR = "./config/secrets/"  # created by the operator, git-ignored
GATEWAY_SECRETS = {"GATEWAY_ADMIN_TOKEN": "gateway_admin_token", "ACME_API_KEY": "acme_api_key",
                   "GLOBEX_API_KEY": "globex_api_key", "BATCH_API_KEY": "batch_api_key"}

SERVICES = {"triton-0", "triton-1", "redis", "gateway", "prometheus", "grafana", "locust"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax binds of a service: container path → host path."""
    out = {}
    for spec in service.get("volumes", []):
        host, container, *_mode = spec.split(":")
        out[container] = host
    return out


def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_triton_workers(services: dict[str, Any]) -> None:
    for name in ("triton-0", "triton-1"):
        triton = services[name]
        assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
        assert triton["image"].endswith("-py3")  # the python backend
        command = triton["command"]
        assert command[0] == "tritonserver"
        assert "--model-repository=/models" in command and "--metrics-port=8002" in command
        assert volumes(triton) == {"/models": "./config/triton/model_repository"}
        assert triton["volumes"][0].endswith(":ro")
        assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
        assert "deploy" not in triton  # the base stack starts without GPUs


def test_gateway_service(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert gateway["build"]["context"] == "."
    assert (ROOT / gateway["build"]["dockerfile"]).is_file()
    assert gateway["command"] == ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
    assert volumes(gateway) == {"/etc/gateway/gateway.yaml": "./config/gateway.compose.yaml"}
    assert gateway["ports"] == ["8000:8000"]
    assert gateway["environment"] == {f"{name}_FILE": f"/run/secrets/{secret}"
                                      for name, secret in GATEWAY_SECRETS.items()}
    assert sorted(gateway["secrets"]) == sorted(GATEWAY_SECRETS.values())
    assert gateway["depends_on"] == {
        "triton-0": {"condition": "service_healthy"},
        "triton-1": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert "/v2/health/live" in " ".join(gateway["healthcheck"]["test"])


def test_redis_prometheus_grafana(services: dict[str, Any]) -> None:
    assert services["redis"]["image"].startswith("redis:7")
    assert "ports" not in services["redis"]  # the compose network only
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert volumes(prometheus) == {
        "/etc/prometheus/prometheus.yml": "./config/prometheus/prometheus.yml",
        "/etc/prometheus/rules.yml": "./config/prometheus/rules.yml",
    }
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]  # no login: this machine only
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert volumes(grafana) == {
        "/etc/grafana/provisioning": "./config/grafana/provisioning",
        "/var/lib/grafana/dashboards": "./config/grafana/dashboards",
    }
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


# ------------------------------------------------------------------------- safe to publish

_EXACT_TAG = re.compile(r"v?\d+\.\d+\.\d+(?:[-.][A-Za-z0-9.-]+)?")  # 7.4.6-alpine, v2.54.1
_TRITON_TAG = re.compile(r"\d{2}\.\d{2}-py3")  # NGC releases are YY.MM


def is_pinned(image: str) -> bool:
    """An exact release (or a digest), never ``latest``, a bare name or ``7-alpine``."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return False
    if name.endswith("tritonserver"):
        return bool(_TRITON_TAG.fullmatch(tag))
    return bool(_EXACT_TAG.fullmatch(tag))


@pytest.mark.parametrize(("image", "pinned"), [
    ("redis:7.4.6-alpine", True), ("prom/prometheus:v2.54.1", True),
    ("nvcr.io/nvidia/tritonserver:24.08-py3", True), ("python:3.11.14-slim-bookworm", True),
    ("redis@sha256:" + "0" * 64, True), ("redis:7-alpine", False), ("redis:latest", False),
    ("redis", False), ("python:3.11-slim", False), ("grafana/grafana", False),
    ("localhost:5000/redis", False), ("nvcr.io/nvidia/tritonserver:latest-py3", False),
])
def test_pin_rule(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned


def pulled_images(compose: dict[str, Any]) -> dict[str, str]:
    """Images the stack pulls (services that build their own name a local tag)."""
    out = {name: s["image"] for name, s in compose["services"].items() if "build" not in s}
    for name, s in compose["services"].items():
        inline = s.get("build", {}).get("dockerfile_inline", "")
        for line in inline.splitlines():
            if line.strip().startswith("FROM "):
                out[f"{name} (build)"] = line.split()[1]
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    out["Dockerfile"] = next(ln.split()[1] for ln in dockerfile if ln.startswith("FROM "))
    return out


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    images = pulled_images(compose)
    assert {"triton-0", "triton-1", "redis", "prometheus", "grafana", "locust (build)",
            "Dockerfile"} <= set(images)
    floating = {name: image for name, image in images.items() if not is_pinned(image)}
    assert not floating, f"floating image tags: {floating}"


def test_prometheus_lifecycle_api_is_off(services: dict[str, Any]) -> None:
    """--web.enable-lifecycle lets anyone who reaches the port quit or reload Prometheus."""
    assert not any("lifecycle" in arg for arg in services["prometheus"]["command"])


def test_grafana_has_no_default_password_and_no_anonymous_access(
        services: dict[str, Any]) -> None:
    env = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # a value or a ${…:-admin} default
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert services["grafana"]["secrets"] == ["grafana_admin_password"]
    assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert str(env["GF_USERS_ALLOW_SIGN_UP"]).lower() == "false"


def test_secrets_come_from_files_that_are_never_committed(compose: dict[str, Any]) -> None:
    secrets = compose["secrets"]
    used = {name for s in compose["services"].values() for name in s.get("secrets", [])}
    assert used == set(secrets)
    for name, spec in secrets.items():
        assert spec == {"file": f"{SECRETS_DIR}{name}"}, name
        done = subprocess.run(["git", "check-ignore", "-q", spec["file"]], cwd=ROOT,
                              timeout=20)
        assert done.returncode == 0, f"{spec['file']} is not git-ignored"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", spec["file"]],
                                 cwd=ROOT, capture_output=True, timeout=20)
        assert tracked.returncode != 0, f"{spec['file']} is committed"
    assert "config" in (ROOT / ".dockerignore").read_text().split()  # nor in an image


def test_no_secret_has_a_value_in_the_compose_files(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"KEY|TOKEN|PASSWORD|SECRET", key) and not key.endswith("_FILE") \
                    and not key.endswith("__FILE"):
                pytest.fail(f"{name}: {key}={value!r} puts a secret in the environment")
    text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|TOKEN|KEY)[A-Z_]*:-[^}]", text)


def test_locust_only_on_demand(services: dict[str, Any]) -> None:
    locust = services["locust"]
    assert locust["profiles"] == ["loadtest"]
    assert "FROM locustio/locust" in locust["build"]["dockerfile_inline"]
    assert volumes(locust)["/mnt/locust"] == "./loadtest"
    command = locust["command"]
    assert command[command.index("-f") + 1] == "/mnt/locust/locustfile.py"
    assert command[command.index("--host") + 1] == "http://gateway:8000"
    assert locust["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_every_referenced_host_path_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for host in volumes(service).values():
            if host in OUTPUT_DIRS:
                continue
            assert not host.startswith(SECRETS_DIR), f"{name}: secrets go through `secrets:`"
            assert host.startswith("./"), (name, host)
            assert (ROOT / host).exists(), f"{name}: {host} does not exist"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"]).is_dir(), name
    assert (ROOT / "config/grafana/dashboards").is_dir()
    assert list((ROOT / "config/grafana/dashboards").glob("*.json"))


def test_prometheus_and_grafana_files_fit_the_mounts(services: dict[str, Any]) -> None:
    prom = load_yaml(ROOT / "config/prometheus/prometheus.yml")
    mounted = set(volumes(services["prometheus"]))
    for rule_file in prom.get("rule_files", []):
        assert str(Path("/etc/prometheus") / rule_file) in mounted, rule_file
    for job in prom["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in services or host == "localhost", (job["job_name"], target)
    providers = load_yaml(ROOT / "config/grafana/provisioning/dashboards/dashboards.yml")
    for provider in providers["providers"]:
        assert provider["options"]["path"] in volumes(services["grafana"])
    datasources = load_yaml(ROOT / "config/grafana/provisioning/datasources/prometheus.yml")
    for source in datasources["datasources"]:
        assert urlsplit(source["url"]).hostname in services


@pytest.fixture(scope="module")
def gateway_config(tmp_path_factory: pytest.TempPathFactory,
                   services: dict[str, Any]) -> GatewayConfig:
    """The compose config as the gateway container loads it: each ${NAME} from the secret
    file that the service's NAME_FILE names (here a temporary copy of /run/secrets)."""
    run_secrets = tmp_path_factory.mktemp("run-secrets")
    env = {}
    for key, target in services["gateway"]["environment"].items():
        secret = Path(target).name
        (run_secrets / secret).write_text(f"{secret}-value\n")
        env[key] = str(run_secrets / secret)
    return load_config(GATEWAY_CONFIG, env=env)


def test_gateway_config_is_valid_and_points_at_the_stack(
        gateway_config: GatewayConfig, services: dict[str, Any]) -> None:
    cfg = gateway_config
    assert cfg.listen.host == "0.0.0.0" and cfg.listen.port == 8000
    assert [w.url for w in cfg.workers] == ["http://triton-0:8000", "http://triton-1:8000"]
    assert [w.resolved_metrics_url() for w in cfg.workers] == [
        "http://triton-0:8002/metrics", "http://triton-1:8002/metrics"]
    for worker in cfg.workers:
        assert urlsplit(worker.url).hostname in services
    redis_url = cfg.admission.redis.url.reveal()
    assert redis_url == "redis://redis:6379/0"
    assert urlsplit(redis_url).hostname in services
    assert cfg.admission.global_limit is not None
    assert cfg.admission.global_limit.scope == "global"
    assert set(cfg.models) <= {p.name for p in MODELS.iterdir() if p.is_dir()}


def test_gateway_config_tenants_match_the_locust_profile(gateway_config: GatewayConfig) -> None:
    profile = load_yaml(ROOT / "loadtest/profile.yaml")
    assert {t["name"] for t in profile["tenants"]} == set(gateway_config.admission.tenants)


def test_gateway_config_reads_every_secret_from_its_file(gateway_config: GatewayConfig) -> None:
    assert gateway_config.admin.token.reveal() == "gateway_admin_token-value"
    keys = {name: [k.reveal() for k in t.keys]
            for name, t in gateway_config.admission.tenants.items()}
    assert keys == {"acme": ["acme_api_key-value"], "globex": ["globex_api_key-value"],
                    "batch-jobs": ["batch_api_key-value"]}


def test_gpu_override_reserves_gpus_for_the_workers_only() -> None:
    override = load_yaml(COMPOSE_GPU)
    assert set(override["services"]) == {"triton-0", "triton-1"}
    for service in override["services"].values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"]
                               for d in devices)


def test_dockerfile() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11.")
    assert is_pinned(instructions[0].split()[1])
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8000" in instructions
    text = "\n".join(instructions)
    assert "pip install ." in text
    assert re.search(r"HEALTHCHECK .*\n?.*?/v2/health/live", text)
    assert instructions[-1] == 'CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "results"} <= set(ignored)


# --------------------------------------------------------------------------- model repository

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Protobuf text format (the subset Triton model configs use) → {field: [values]}."""
    tokens = [m.group(1) or m.group(2) or m.group(3)
              for m in _TOKEN.finditer(text) if m.group(1) or m.group(2) or m.group(3)]
    pos = 0

    def scalar(token: str) -> Any:
        if token.startswith('"'):
            return token[1:-1]
        try:
            return int(token)
        except ValueError:
            return token

    def value() -> Any:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        return scalar(token)

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        fields: dict[str, list[Any]] = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            item = value()
            fields.setdefault(name, []).extend(item if isinstance(item, list)
                                               and name not in ("dims",) else [item])
        pos += 1
        return fields

    return message(None)


def tensors(config: dict[str, list[Any]], kind: str) -> dict[str, tuple[str, list[int]]]:
    batch = [1] if config.get("max_batch_size", [0])[0] > 0 else []
    return {t["name"][0]: (t["data_type"][0], batch + t["dims"][0]) for t in config[kind]}


def test_add_sub_model_config_matches_the_contract() -> None:
    config = parse_pbtxt((MODELS / "add_sub/config.pbtxt").read_text())
    assert config["name"] == ["add_sub"] and config["backend"] == ["python"]
    # What a client sends: FP32 [1, 16] for both inputs, both outputs back.
    assert tensors(config, "input") == {"INPUT0": ("TYPE_FP32", [1, 16]),
                                        "INPUT1": ("TYPE_FP32", [1, 16])}
    assert tensors(config, "output") == {"OUTPUT0": ("TYPE_FP32", [1, 16]),
                                         "OUTPUT1": ("TYPE_FP32", [1, 16])}
    assert (MODELS / "add_sub/1/model.py").is_file()


def test_strings_model_config_matches_the_contract() -> None:
    config = parse_pbtxt((MODELS / "strings/config.pbtxt").read_text())
    assert config["name"] == ["strings"] and config["backend"] == ["python"]
    assert tensors(config, "input") == {"TEXT": ("TYPE_STRING", [1, 1])}
    assert tensors(config, "output") == {"UPPER": ("TYPE_STRING", [1, 1]),
                                         "LENGTH": ("TYPE_INT64", [1, 1])}


def test_profile_models_match_the_repository() -> None:
    """The Locust kit's add_sub and strings requests fit the models the stack serves."""
    profile = load_yaml(ROOT / "loadtest/profile.yaml")
    types_ = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}
    for name in ("add_sub", "strings"):
        config = parse_pbtxt((MODELS / name / "config.pbtxt").read_text())
        want = tensors(config, "input")
        spec = profile["models"][name]
        got = {t["name"]: (types_[t["datatype"]], t["shape"]) for t in spec["inputs"]}
        assert got == want
        assert set(spec["outputs"]) == set(tensors(config, "output"))


class _Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> Any:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor]) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}


def run_python_model(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Execute a python-backend model.py with a minimal stand-in for Triton's pb_utils."""
    pb_utils = types.ModuleType("triton_python_backend_utils")
    pb_utils.Tensor = _Tensor  # type: ignore[attr-defined]
    pb_utils.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb_utils.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda req, name: _Tensor(name, req[name]))
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb_utils
    try:
        namespace: dict[str, Any] = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        responses = namespace["TritonPythonModel"]().execute([request])
    finally:
        if saved is None:
            del sys.modules["triton_python_backend_utils"]
        else:
            sys.modules["triton_python_backend_utils"] = saved
    outputs: dict[str, Any] = responses[0].outputs
    return outputs


def test_python_models_compute_their_contract() -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 2.0, dtype=np.float32)
    out = run_python_model(MODELS / "add_sub/1/model.py", {"INPUT0": a, "INPUT1": b})
    assert out["OUTPUT0"].dtype == np.float32 and np.array_equal(out["OUTPUT0"], a + b)
    assert np.array_equal(out["OUTPUT1"], a - b)
    text = np.array([[b"hello"], [b"gateway!"]], dtype=np.object_)
    out = run_python_model(MODELS / "strings/1/model.py", {"TEXT": text})
    assert out["UPPER"].tolist() == [[b"HELLO"], [b"GATEWAY!"]]
    assert out["LENGTH"].dtype == np.int64 and out["LENGTH"].tolist() == [[5], [8]]


# --------------------------------------------------------------------------- docker compose

def _compose_plugin() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    try:
        done = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker compose version failed: {exc}"
    if done.returncode != 0:
        return "the docker compose plugin is not installed (`docker compose version` failed)"
    return None


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.gpu.yml")])
def test_docker_compose_config_validates(files: tuple[str, ...]) -> None:
    missing = _compose_plugin()
    if missing:
        pytest.skip(missing)
    command = ["docker", "compose"]
    for name in files:
        command += ["-f", name]
    done = subprocess.run([*command, "--profile", "loadtest", "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
