"""Scaling integration files: Prometheus config and rules (promtool), Grafana provisioning and
dashboard, Kubernetes manifests (kubernetes-validate offline) and the KEDA ScaledObject."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.core.config import parse_config
from gateway.core.schema import ConfigError
from tests.tools import require_tool

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "config"
needs_promtool = pytest.mark.tool("promtool")

GATEWAY_METRICS = {
    "gateway_requests_total", "gateway_rejections_total", "gateway_queue_length",
    "gateway_batch_fill_ratio", "gateway_worker_in_flight", "gateway_worker_slots",
    "gateway_worker_utilisation", "gateway_worker_pending", "gateway_worker_gpu_free_bytes",
    "gateway_worker_gpu_total_bytes", "gateway_worker_breaker_state", "gateway_worker_ready",
    "gateway_fleet_utilisation", "gateway_fleet_headroom", "gateway_fleet_saturation",
    "gateway_arrival_rate_per_s", "gateway_desired_replicas",
    "gateway_event_loop_lag_seconds", "gateway_worker_capacity_units",
    # fair share (gateway.core.fairshare): per tenant, and Jain's index
    "gateway_tenant_gpu_seconds_total", "gateway_tenant_requests_settled_total",
    "gateway_tenant_queue_wait_seconds_total", "gateway_tenant_gpu_share",
    "gateway_tenant_weight", "gateway_fairness_jain_index",
    # replicas as one (gateway.engine.coordinator)
    "gateway_cluster_members", "gateway_cluster_share", "gateway_cluster_coordinated",
    # stalls, retries and hedges (gateway.core.stall, gateway.core.hedge)
    "gateway_worker_stalled", "gateway_attempts_repeated_total", "gateway_hedges_won_total",
    "gateway_worker_stalls_total",
}
GATEWAY_HISTOGRAMS = {"gateway_request_duration_seconds", "gateway_upstream_duration_seconds",
                      "gateway_queue_wait_seconds", "gateway_batch_size"}
KNOWN = GATEWAY_METRICS | GATEWAY_HISTOGRAMS | {
    f"{h}_{suffix}" for h in GATEWAY_HISTOGRAMS for suffix in ("bucket", "sum", "count")}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def recording_rules() -> set[str]:
    rules = _load_yaml(CONFIG / "prometheus" / "rules.yml")
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name gateway or Triton series."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return {m for m in _IDENT.findall(without_strings) if m.startswith(("gateway", "nv_"))}


def check_names(expr: str, extra: frozenset[str] | set[str] = frozenset()) -> None:
    for name in metric_names(expr):
        assert name in KNOWN or name in extra or name.startswith("nv_"), (
            f"{name!r} in {expr!r} is not a fixed gateway metric, a recording rule or nv_*")


# --- Prometheus -------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = subprocess.run([require_tool("promtool"), "check", "rules",
                           "config/prometheus/rules.yml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    proc = subprocess.run([require_tool("promtool"), "check", "config",
                           "config/prometheus/prometheus.yml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    proc = subprocess.run([require_tool("promtool"), "test", "rules", "tests/data/rules_test.yml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_gateway_and_workers() -> None:
    cfg = _load_yaml(CONFIG / "prometheus" / "prometheus.yml")
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in cfg["scrape_configs"]}
    assert targets["gateway"] == ["gateway:8000"]
    assert sorted(targets["triton"]) == ["triton-0:8002", "triton-1:8002"]
    assert cfg["rule_files"] == ["rules.yml"]


def test_rules_use_only_fixed_metric_names() -> None:
    rules = _load_yaml(CONFIG / "prometheus" / "rules.yml")
    records = recording_rules()
    assert {"gateway:desired_replicas:max", "gateway:fleet_utilisation:avg1m",
            "gateway:rejection_ratio:rate5m"} <= records
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"GatewayHeadroomLow", "GatewaySaturationHigh", "GatewayP99OverBudget",
            "GatewayBreakerOpen"} <= alerts
    for group in rules["groups"]:
        for rule in group["rules"]:
            check_names(rule["expr"], records)


# --- Grafana ----------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    ds = _load_yaml(CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    source = ds["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    boards = _load_yaml(CONFIG / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")
    assert boards["providers"][0]["type"] == "file"
    assert boards["providers"][0]["options"]["path"]
    dash = json.loads((CONFIG / "grafana" / "dashboards" / "gateway.json").read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]


def test_dashboard_queries_only_known_metrics() -> None:
    dash = json.loads((CONFIG / "grafana" / "dashboards" / "gateway.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("utilisation", "headroom", "desired replicas", "p99", "rejections",
                  "in flight", "free gpu memory", "breaker"):
        assert topic in titles
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert any('max by (mode) (gateway_desired_replicas)' in e for e in exprs)
    queried: set[str] = set()
    for expr in exprs:
        check_names(expr, recording_rules())
        queried |= metric_names(expr)
    assert "gateway_rejections_total" in queried and "gateway_worker_breaker_state" in queried
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_name_checker_catches_strangers() -> None:
    with pytest.raises(AssertionError):
        check_names("rate(gateway_requests_count[1m])")
    check_names('sum(rate(gateway_requests_total{outcome="gateway_x"}[1m]))')


# --- Kubernetes -------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((CONFIG / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.mark.parametrize("key", sorted(k for k, d in manifests().items()
                                       if not d["apiVersion"].startswith("keda.sh/")))
def test_core_manifests_validate_offline(key: str) -> None:
    doc = manifests()[key]
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    doc = manifests()["Deployment/gateway"]
    broken = json.loads(json.dumps(doc))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_expected_kinds_present() -> None:
    keys = set(manifests())
    assert {"Deployment/gateway", "Service/gateway", "ConfigMap/gateway-config",
            "PodDisruptionBudget/gateway", "Service/triton", "Deployment/triton",
            "HorizontalPodAutoscaler/triton", "ScaledObject/triton"} <= keys


def test_configmap_embeds_a_valid_gateway_config() -> None:
    docs = manifests()
    text = docs["ConfigMap/gateway-config"]["data"]["gateway.yaml"]
    cfg = parse_config(yaml.safe_load(text), env={})
    triton = docs["Service/triton"]
    namespace = triton["metadata"]["namespace"]
    assert cfg.discovery is not None
    assert cfg.discovery.dns_name == f"triton.{namespace}.svc.cluster.local"
    assert triton["spec"]["clusterIP"] == "None"     # headless: one A record per pod
    ports = {p["name"]: p["port"] for p in triton["spec"]["ports"]}
    assert cfg.discovery.port == ports["http"] and cfg.discovery.metrics_port == ports["metrics"]
    assert cfg.listen.host == "0.0.0.0"
    gw = docs["Deployment/gateway"]["spec"]["template"]["spec"]
    assert gw["volumes"][0]["configMap"]["name"] == "gateway-config"
    command = gw["containers"][0]["command"]
    assert command[:2] == ["gateway", "serve"]
    assert command[command.index("--config") + 1] == "/etc/gateway/gateway.yaml"


def test_selectors_match_pod_labels() -> None:
    docs = manifests()
    for service, deployment in (("Service/gateway", "Deployment/gateway"),
                                ("Service/triton", "Deployment/triton"),
                                ("PodDisruptionBudget/gateway", "Deployment/gateway")):
        spec = docs[service]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        labels = docs[deployment]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), service


def test_hpa_follows_the_desired_replicas_signal() -> None:
    hpa = manifests()["HorizontalPodAutoscaler/triton"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "triton"}
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == "gateway_desired_replicas"
    assert metric["metric"]["selector"]["matchLabels"] == {"mode": "predictive"}
    assert metric["target"] == {"type": "AverageValue", "averageValue": "1"}


def test_keda_scaled_object_structure() -> None:
    so = manifests()["ScaledObject/triton"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == "triton"
    assert 0 < spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"     # replicas = ceil(value / threshold)
    meta = trigger["metadata"]
    assert meta["query"] == 'max(gateway_desired_replicas{mode="predictive"})'
    assert meta["threshold"] == "1"
    assert meta["serverAddress"].startswith("http://")
    assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is string-typed
    behaviour = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behaviour["scaleDown"]["stabilizationWindowSeconds"] == 300


# --- safe to publish --------------------------------------------------------------------------


def containers() -> dict[str, dict[str, Any]]:
    out = {}
    for key, doc in manifests().items():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out[f"{key}/{c['name']}"] = c
    return out


def test_images_are_pinned_to_a_release() -> None:
    pinned = re.compile(r"[^:@]+(@sha256:[0-9a-f]{64}|:(v?\d+\.\d+\.\d+\S*|\d{2}\.\d{2}-py3))")
    images = {key: c["image"] for key, c in containers().items()}
    assert images
    for key, image in images.items():
        assert pinned.fullmatch(image), f"{key}: {image} is not pinned to a release"
        assert not image.endswith(":latest")


def test_gateway_secrets_come_from_a_secret() -> None:
    """No secret is written in a manifest: the Deployment references the Secret
    gateway-secrets (created by the operator), and no Secret with values ships here."""
    assert not [k for k in manifests() if k.startswith("Secret/")]
    gateway = containers()["Deployment/gateway/gateway"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"GATEWAY_ADMIN_TOKEN", "REDIS_URL"} <= set(refs)
    assert {r["name"] for r in refs.values()} == {"gateway-secrets"}
    for key, container in containers().items():
        for env in container.get("env", []):
            if re.search(r"KEY|TOKEN|PASSWORD|SECRET", env["name"]):
                assert "value" not in env, f"{key}: {env['name']} has a literal value"
    text = manifests()["ConfigMap/gateway-config"]["data"]["gateway.yaml"]
    for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", text):
        if re.search(r"KEY|TOKEN|PASSWORD|SECRET", name):
            assert default == "", f"${{{name}}} falls back to {default!r}"


def test_pods_are_locked_down() -> None:
    docs = manifests()
    for name in ("Deployment/gateway", "Deployment/triton"):
        assert docs[name]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    context = containers()["Deployment/gateway/gateway"]["securityContext"]
    assert context["runAsNonRoot"] and not context["allowPrivilegeEscalation"]
    assert context["readOnlyRootFilesystem"]


def test_configmap_config_rejects_a_redis_url_with_a_bad_scheme() -> None:
    text = manifests()["ConfigMap/gateway-config"]["data"]["gateway.yaml"]
    cfg = parse_config(yaml.safe_load(text), env={"REDIS_URL": "redis://:pw@r:6379/0"})
    assert cfg.admission.redis.url.reveal() == "redis://:pw@r:6379/0"
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_load(text), env={"REDIS_URL": "http://r:6379"})
    assert info.value.path == "admission.redis.url"
