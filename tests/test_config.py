"""Configuration: typed loading, errors with dotted paths, env secrets, the CLI, and the
README's reference kept in step with the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import GatewayConfig, describe_config, load_config, parse_config
from gateway.schema import ConfigError, Secret
from gateway.server import config_reference_markdown

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"listen": {"host": "127.0.0.1", "port": 8000},
           "workers": [{"url": "http://127.0.0.1:8100",
                        "metrics_url": "http://127.0.0.1:8102/metrics"}]}


def test_minimal_form_from_the_issue() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.listen.port == 8000
    assert cfg.workers[0].resolved_metrics_url() == "http://127.0.0.1:8102/metrics"
    cfg = parse_config({"workers": [{"url": "http://10.0.0.5:8000"}]})
    assert cfg.workers[0].resolved_metrics_url() == "http://10.0.0.5:8002/metrics"


def test_discovery_instead_of_a_static_list() -> None:
    cfg = parse_config({"discovery": {"dns_name": "triton.ml.svc.cluster.local"}})
    assert cfg.discovery is not None and cfg.discovery.interval_s == 10.0
    assert cfg.workers == ()


@pytest.mark.parametrize(("data", "path", "fragment"), [
    ({}, "workers", "at least one worker"),
    ({"workers": [{"url": "localhost:8000"}]}, "workers[0].url", "http://host:port"),
    ({"workers": [{"url": "http://a:1", "slots": 0}]}, "workers[0].slots", "> 0"),
    ({"workers": [{"url": "http://a:1"}], "routing": {"polcy": "x"}}, "routing.polcy",
     "did you mean 'policy'"),
    ({"workers": [{"url": "http://a:1"}], "routing": {"policy": "fastest"}}, "routing.policy",
     "one of"),
    ({"workers": [{"url": "http://a:1"}], "listen": {"port": "80"}}, "listen.port",
     "an integer"),
    ({"workers": [{"url": "http://a:1"}], "listen": {"port": 70000}}, "listen.port",
     "a port number"),
    ({"workers": [{"url": "http://a:1"}],
      "models": {"add_sub": {"batching": {"max_delay_ms": -1}}}},
     "models.add_sub.batching.max_delay_ms", ">= 0"),
    ({"workers": [{"url": "http://a:1"}],
      "admission": {"tenants": {"t": {"rate_limit": {"burst": 5}}}}},
     "admission.tenants.t.rate_limit.rate_per_s", "required"),
    ({"workers": [{"url": "http://a:1"}, {"url": "http://a:1"}]}, "workers[1].url",
     "duplicate"),
    ({"workers": [{"url": "http://a:1", "pool": "cloud"}], "pools": [{"name": "onprem"}]},
     "workers[0].pool", "unknown pool"),
    ({"workers": [{"url": "http://a:1"}], "admission": {"breaker": {"error_rate": 2}}},
     "admission.breaker.error_rate", "between 0 and 1"),
    ({"workers": [{"url": "http://a:1"}], "health": True}, "health", "a mapping"),
    ({"workers": "http://a:1"}, "workers", "a list"),
])
def test_bad_config_names_the_dotted_path(data: dict[str, object], path: str,
                                           fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == path
    assert fragment in str(info.value)


def test_secrets_from_environment_and_masked() -> None:
    data = {**MINIMAL, "admin": {"token": "${GW_TOKEN}"},
            "admission": {"tenants": {"acme": {"keys": ["${ACME_KEY:-dev-key}"]}}}}
    cfg = parse_config(data, env={"GW_TOKEN": "t0ps3cret"})
    assert cfg.admin.token.reveal() == "t0ps3cret"
    assert cfg.admission.tenants["acme"].keys[0].reveal() == "dev-key"
    assert "t0ps3cret" not in repr(cfg) and "dev-key" not in repr(cfg)
    assert describe_config(cfg)["admin"]["token"] == "***"
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert info.value.path == "admin.token" and "GW_TOKEN" in str(info.value)
    assert repr(Secret("x")) == "Secret('***')"


def test_yaml_syntax_error_has_a_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  - url: [http://a:1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "line" in str(info.value)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**MINIMAL, "admin": {"token": "abc"}}))
    out = run_cli("check-config", str(good))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "abc" not in out.stdout and "'***'" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workers": [{"url": "http://a:1", "slotz": 3}]}))
    out = run_cli("check-config", str(bad))
    assert out.returncode == 1
    assert "workers[0].slotz: unknown key (did you mean 'slots'?)" in out.stderr
    out = run_cli("serve", "--config", str(bad))
    assert out.returncode == 2
    assert "workers[0].slotz" in out.stderr


def test_shipped_example_configs_are_valid() -> None:
    for path in [ROOT / "config" / "gateway.yaml", ROOT / "config" / "gateway.compose.yaml"]:
        cfg = load_config(path, env={"GATEWAY_ADMIN_TOKEN": "x", "REDIS_URL": "redis://r:6379",
                                     "TENANT_ACME_KEY": "k1", "TENANT_BATCH_KEY": "k2"})
        assert isinstance(cfg, GatewayConfig)


def test_readme_configuration_reference_matches_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    documented = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert documented == config_reference_markdown().strip(), (
        "README configuration reference is stale: regenerate it with "
        "`python -m gateway config-reference`")
