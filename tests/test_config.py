"""Configuration: typed loading, errors with dotted paths (all of a file's at once), ranges
and cross-field rules, duplicate YAML keys, env and file secrets, credentials masked, the CLI,
the shipped examples without fallback keys, and the reference in docs/configuration.md kept in
step with the schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from gateway.app.service import GatewayService
from gateway.core.config import (
    GatewayConfig,
    UniqueKeyLoader,
    describe_config,
    load_config,
    parse_config,
)
from gateway.core.schema import ConfigError, ConfigIssue, Secret, mask_url
from gateway.server import config_reference_markdown, reload_from_file

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
    # ranges: every port 1–65535, in URLs too (99999 used to be a traceback at start)
    ({"workers": [{"url": "http://a:99999"}]}, "workers[0].url", "port 1–65535"),
    ({"workers": [{"url": "http://a:0"}]}, "workers[0].url", "port 1–65535"),
    ({"workers": [{"url": "http://a:1", "metrics_url": "http://a:99999/metrics"}]},
     "workers[0].metrics_url", "port 1–65535"),
    ({"workers": [{"url": "http://[::1:8000"}]}, "workers[0].url", "http://host:port"),
    ({"discovery": {"dns_name": "t", "port": 70000}}, "discovery.port", "1–65535"),
    ({"discovery": {"dns_name": "t", "metrics_port": 0}}, "discovery.metrics_port", "1–65535"),
    # schemes
    ({"workers": [{"url": "ftp://a:1"}]}, "workers[0].url", "http://host:port"),
    ({"workers": [{"url": "https://a:1"}]}, "workers[0].url", "http://host:port"),
    ({"workers": [{"url": "http://a:1", "metrics_url": "file:///etc/passwd"}]},
     "workers[0].metrics_url", "http://host[:port]"),
    ({"workers": [{"url": "http://a:1"}], "admission": {"redis": {"url": "http://r:6379"}}},
     "admission.redis.url", "redis://"),
    # cross-field rules
    ({"workers": [{"url": "http://a:1"}], "capacity": {"min_replicas": 5, "max_replicas": 2}},
     "capacity.min_replicas", "at most max_replicas (2)"),
    ({"workers": [{"url": "http://a:1"}],
      "admission": {"queue": {"shed_sheddable_at": 0.9, "shed_standard_at": 0.5}}},
     "admission.queue.shed_sheddable_at", "at most shed_standard_at"),
    ({"workers": [{"url": "http://a:1"}],
      "admission": {"breaker": {"open_s": 600, "max_open_s": 300}}},
     "admission.breaker.max_open_s", "at least open_s"),
    ({"workers": [{"url": "http://a:1"}],
      "admission": {"tenants": {"a": {"keys": ["k1"]}, "b": {"keys": ["k2", "k1"]}}}},
     "admission.tenants.b.keys[1]", "tenant 'a' has it too"),
    # empty and blank keys (an unset ${KEY:-} used to authenticate with an empty header)
    ({"workers": [{"url": "http://a:1"}],
      "admission": {"tenants": {"a": {"keys": ["${UNSET_TENANT_KEY:-}"]}}}},
     "admission.tenants.a.keys[0]", "non-empty API key"),
    ({"workers": [{"url": "http://a:1"}], "admission": {"tenants": {"a": {"keys": [" \t"]}}}},
     "admission.tenants.a.keys[0]", "non-empty API key"),
    ({"workers": [{"url": "http://a:1"}], "admission": {"tenants": {"a": {"keys": ["k "]}}}},
     "admission.tenants.a.keys[0]", "whitespace"),
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


@pytest.mark.parametrize("data", [
    {"workers": [{"url": "http://a:1"}], "listen": {"port": 0}},
    {"workers": [{"url": "http://a:65535", "metrics_url": "http://a/metrics"}]},
    {"workers": [{"url": "http://[::1]:8000"}]},
    {"workers": [{"url": "http://a:1"}],
     "admission": {"queue": {"shed_sheddable_at": 0.7, "shed_standard_at": 0.7}},
     "capacity": {"min_replicas": 3, "max_replicas": 3}},
    {"workers": [{"url": "http://a:1"}], "admission": {"redis": {"url": "rediss://r"}}},
    {"workers": [{"url": "http://a:1"}], "admission": {"redis": {"url": "unix:///run/r.sock"}}},
])
def test_edge_values_are_accepted(data: dict[str, object]) -> None:
    assert isinstance(parse_config(data), GatewayConfig)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""\
listen: {port: 8000}
workers:
  - url: http://a:99999
  - {url: "http://b:1", slotz: 3}
routing: {policy: fastest}
admission:
  tenants:
    a: {keys: ["${UNSET_TENANT_KEY:-}"]}
  queue: {shed_sheddable_at: 0.9, shed_standard_at: 0.5}
capacity: {min_replicas: 5, max_replicas: 2}
listen: {port: 8001}
""")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    paths = [issue.path for issue in info.value.errors]
    assert paths == ["listen", "workers[0].url", "workers[1].slotz", "routing.policy",
                     "admission.tenants.a.keys[0]", "admission.queue.shed_sheddable_at",
                     "capacity.min_replicas"]
    message = str(info.value)
    assert message.startswith("7 problems:")
    assert all(f"  {issue}" in message for issue in info.value.errors)
    assert info.value.path == "listen"  # the first, for one-line callers


def test_a_single_problem_reads_as_before() -> None:
    error = ConfigError("a.b", "expected x")
    assert str(error) == "a.b: expected x" and error.errors == (ConfigIssue("a.b", "expected x"),)


@pytest.mark.parametrize(("text", "path", "lines"), [
    ("workers: []\nworkers: [{url: 'http://a:1'}]\n", "workers", "line 2 (first at line 1)"),
    ("workers:\n  - url: http://a:1\n    url: http://b:1\n", "workers[0].url",
     "line 3 (first at line 2)"),
    ("workers: [{url: 'http://a:1'}]\nadmission: {tenants: {t: {keys: [k1]}, t: {}}}\n",
     "admission.tenants.t", "line 2 (first at line 2)"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, path: str,
                                         lines: str) -> None:
    bad = tmp_path / "dup.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.path == path
    assert "duplicate key" in str(info.value) and lines in str(info.value)
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        yaml.load(text, Loader=UniqueKeyLoader)


def test_merge_keys_and_anchors_are_not_duplicates(tmp_path: Path) -> None:
    good = tmp_path / "merge.yaml"
    good.write_text("x-worker: &w {pool: default, slots: 4}\n"
                    "workers:\n  - {<<: *w, url: 'http://a:1', slots: 8}\n")
    with pytest.raises(ConfigError) as info:  # x-worker is no key of the schema ...
        load_config(good)
    assert [e.path for e in info.value.errors] == ["x-worker"]  # ... but no duplicate


@pytest.mark.parametrize(("url", "masked"), [
    ("http://user:pass@host:8000/x", "http://user:***@host:8000/x"),
    ("http://:pass@host", "http://:***@host"),
    ("http://token@host:1", "http://***@host:1"),
    ("redis://default:s3cret@redis:6379/0", "redis://default:***@redis:6379/0"),
    ("http://a:b@host:99999", "http://a:***@host:99999"),
    ("http://host/metrics?token=abc&x=1", "http://host/metrics?token=***&x=1"),
    ("http://host:8002/metrics", "http://host:8002/metrics"),
    ("not a url: user:pass@host", "not a url: user:pass@host"),
    ("", ""),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_credentials_in_urls_are_masked_everywhere() -> None:
    data = {"workers": [{"url": "http://op:w0rkerpw@a:8000",
                         "metrics_url": "http://op:m3tricspw@a:8002/metrics"}],
            "admission": {"redis": {"url": "redis://:r3dispw@redis:6379/0"}}}
    cfg = parse_config(data)
    shown = [repr(cfg), str(cfg.workers[0]), yaml.safe_dump(describe_config(cfg))]
    for text in shown:
        for secret in ("w0rkerpw", "m3tricspw", "r3dispw"):
            assert secret not in text
    assert "http://op:***@a:8000" in shown[0] and "http://op:***@a:8000" in shown[2]
    # and in error messages that quote a bad value
    with pytest.raises(ConfigError) as info:
        parse_config({"workers": [{"url": "ftp://op:w0rkerpw@a:1"}]})
    assert "w0rkerpw" not in str(info.value) and "ftp://op:***@a:1" in str(info.value)


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("fr0m-file\n")
    data = {**MINIMAL, "admin": {"token": "${GW_TOKEN}"}}
    cfg = parse_config(data, env={"GW_TOKEN_FILE": str(tmp_path / "token")})
    assert cfg.admin.token.reveal() == "fr0m-file"
    cfg = parse_config(data, env={"GW_TOKEN": "env-wins",
                                  "GW_TOKEN_FILE": str(tmp_path / "token")})
    assert cfg.admin.token.reveal() == "env-wins"
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={"GW_TOKEN_FILE": str(tmp_path / "missing")})
    assert info.value.path == "admin.token" and "cannot read GW_TOKEN_FILE" in str(info.value)


def test_reload_of_a_bad_file_is_refused_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workers": [{"url": "http://a:99999"}]}))
    svc = cast(GatewayService, type("Svc", (), {"config_path": str(bad)})())
    ok, message = reload_from_file(svc)
    assert not ok and "workers[0].url" in message and "old configuration stays" in message


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


def test_check_config_cli_lists_every_error_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n"
                   "  - url: http://op:w0rkerpw@a:99999\n"
                   "    metrics_url: http://op:m3tricspw@a:99999/metrics\n"
                   "admission:\n"
                   "  tenants:\n"
                   "    a: {keys: ['${UNSET_TENANT_KEY:-}']}\n"
                   "  queue: {shed_sheddable_at: 0.95}\n"
                   "capacity: {min_replicas: 9, max_replicas: 3}\n"
                   "capacity: {}\n")
    out = run_cli("check-config", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    for path in ("capacity", "workers[0].url", "workers[0].metrics_url",
                 "admission.tenants.a.keys[0]", "admission.queue.shed_sheddable_at"):
        assert re.search(rf"^  {re.escape(path)}: ", out.stderr, re.M), (path, out.stderr)
    assert "w0rkerpw" not in out.stderr and "m3tricspw" not in out.stderr
    out = run_cli("serve", "--config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "admission.tenants.a.keys[0]" in out.stderr


def test_check_config_cli_masks_url_credentials(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"workers": [{
        "url": "http://op:w0rkerpw@a:8000", "metrics_url": "http://op:m3tricspw@a:8002/m"}]}))
    out = run_cli("check-config", str(good))
    assert out.returncode == 0, out.stderr
    assert "w0rkerpw" not in out.stdout and "m3tricspw" not in out.stdout
    assert "http://op:***@a:8000" in out.stdout


EXAMPLES = [ROOT / "config" / "gateway.yaml", ROOT / "config" / "gateway.compose.yaml"]
EXAMPLE_ENV = {"GATEWAY_ADMIN_TOKEN": "x", "REDIS_URL": "redis://r:6379", "ACME_API_KEY": "k1",
               "GLOBEX_API_KEY": "k2", "BATCH_API_KEY": "k3"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_example_configs_are_valid(path: Path) -> None:
    cfg = load_config(path, env=EXAMPLE_ENV)
    assert isinstance(cfg, GatewayConfig)
    keys = {k.reveal() for t in cfg.admission.tenants.values() for k in t.keys}
    assert keys and keys <= {"k1", "k2", "k3"}


_SECRETISH = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET", re.I)
_DEFAULTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}")


def _shipped_text_files() -> list[Path]:
    return [*EXAMPLES, *sorted((ROOT / "config" / "k8s").glob("*.yaml")),
            *sorted(ROOT.glob("docker-compose*.yml"))]


@pytest.mark.parametrize("path", _shipped_text_files(), ids=lambda p: p.name)
def test_no_well_known_fallback_secrets(path: Path) -> None:
    """``${ACME_API_KEY:-acme-demo-key}`` served a published key whenever the variable was
    forgotten: a secret-looking variable may fall back to nothing, never to a value."""
    for name, default in _DEFAULTED.findall(path.read_text()):
        if _SECRETISH.search(name):
            assert default == "", f"{path.name}: ${{{name}}} falls back to {default!r}"
    assert "demo-key" not in path.read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_refuse_to_start_without_their_keys(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert all("API_KEY" in e.problem for e in info.value.errors)
    env: dict[str, Any] = {**EXAMPLE_ENV, "ACME_API_KEY": ""}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert [e.path for e in info.value.errors] == ["admission.tenants.acme.keys[0]"]


def test_documented_check_config_commands_parse() -> None:
    """Comments in the examples show `gateway check-config FILE` (not --config FILE)."""
    for path in EXAMPLES:
        for line in path.read_text().splitlines():
            if "check-config" in line:
                assert re.search(r"check-config (?!-)\S+\.yaml", line), (path.name, line)
    out = run_cli("check-config", "--help")
    assert out.returncode == 0 and "--config" not in out.stdout


def test_readme_configuration_reference_matches_the_schema() -> None:
    readme = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    documented = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert documented == config_reference_markdown().strip(), (
        "docs/configuration.md configuration reference is stale: regenerate it with "
        "`python -m gateway config-reference`")


def test_top_level_batching_is_every_models_default_unless_a_model_says_otherwise() -> None:
    cfg = parse_config({
        "workers": [{"url": "http://a:1"}],
        "batching": {"enabled": True, "max_delay_ms": 2},
        "models": {"named": {"cost": "batch_size"},
                   "opted_out": {"batching": {"enabled": False}},
                   "own": {"batching": {"enabled": True, "max_delay_ms": 9}}},
    })
    assert cfg.model("unlisted").batching.enabled
    assert cfg.model("unlisted").batching.max_delay_ms == 2
    assert cfg.model("named").batching.enabled and cfg.model("named").cost == "batch_size"
    assert not cfg.model("opted_out").batching.enabled
    assert cfg.model("own").batching.max_delay_ms == 9
    # without the section nothing batches
    plain = parse_config({"workers": [{"url": "http://a:1"}], "models": {"m": {}}})
    assert not plain.model("m").batching.enabled and not plain.model("x").batching.enabled
