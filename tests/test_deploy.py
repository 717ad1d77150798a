"""deploy/: Kubernetes manifests validate, alert rules pass promtool, and a real Prometheus scraping the real
service evaluates every PromQL expression of the rules and the Grafana dashboard (no Docker engine needed)."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from conftest import RunningServer, free_port, wait_until_ok
from monosemantic.client import RestClient
from monosemantic.shipped import reference_registry_path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.33.0"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: .ci/run installs Debian's prometheus package (prometheus, promtool)"
    return path


@pytest.mark.parametrize("manifest", sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")))
def test_each_kubernetes_manifest_validates_strictly(manifest):
    for document in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_deployment_probes_readiness_and_liveness_and_mounts_the_registry():
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/registry", "/etc/monosemantic/keys"}
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]
    from service.settings import ServiceSettings

    assert set(config) <= {f"MONOSEMANTIC_{name.upper()}" for name in ServiceSettings.model_fields}


@pytest.mark.prometheus
def test_promtool_accepts_the_alert_rules():
    result = subprocess.run([_tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "rules.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_and_the_dockerfile_point_at_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source




def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def _panel_expressions(dictionary: str | None = None) -> list[str]:
    """The dashboard's queries as Grafana sends them: $__rate_interval at 1m, $dictionary at a chosen value (None:
    "All", the variable's allValue)."""
    variable = {v["name"]: v for v in _dashboard()["templating"]["list"]}["dictionary"]
    value = variable["allValue"] if dictionary is None else dictionary
    return [target["expr"].replace("$__rate_interval", "1m").replace("$dictionary", value)
            for panel in _dashboard()["panels"] for target in panel["targets"]]


def _expressions() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]] + _panel_expressions()


# Series labelled by dictionary: every dashboard query of one of them is filtered by the $dictionary variable.
DICTIONARY_SERIES = ("monosemantic_active_features_per_token", "monosemantic_tokens_processed", "monosemantic_observed_tokens",
                     "monosemantic_reconstruction_", "monosemantic_activation_squared_norm", "monosemantic_watched_feature_",
                     "monosemantic_dictionary_evaluation", "monosemantic_dictionary_info")


def test_the_dashboard_has_a_multi_select_dictionary_variable_filtering_every_dictionary_panel():
    dashboard = _dashboard()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "dictionary"]
    assert variable["query"] == "label_values(monosemantic_dictionary_info, name)"
    assert variable["multi"] and variable["includeAll"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    filtered = [e for e in exprs if any(series in e for series in DICTIONARY_SERIES)]
    assert len(filtered) >= 7
    assert all(e.count("$dictionary") == sum(e.count(s) for s in DICTIONARY_SERIES) for e in filtered), filtered


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real service with watched features, scraped every second by a real Prometheus loading the rules."""
    service = RunningServer(registry=reference_registry_path(), watch_features="3329:def,2508:import")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules.yaml")],
        "scrape_configs": [{"job_name": "monosemantic", "static_configs": [{"targets": [f"127.0.0.1:{service.server.http_port}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([_tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/-/ready", timeout=60)
        _wait_for(url, 'count_over_time(up{job="monosemantic"}[1m])', 1)  # the first scrape comes a few seconds in
        with RestClient(service.http_url) as client:
            for _ in range(3):
                client.activations(text="def main():\n    import os\n    return os.getcwd()\n")
                client.observe(["import sys\nimport re\n\ndef f(x):\n    return x\n"])
                time.sleep(1.2)  # traffic across several scrapes, so rate() has points
        _wait_for(url, 'count_over_time(up{job="monosemantic"}[1m])', 5)
        yield service, url
    finally:
        process.terminate()
        process.wait(20)
        service.stop()


def _wait_for(url: str, expr: str, at_least: float, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = httpx.get(f"{url}/api/v1/query", params={"query": expr}).json()["data"]["result"]
        if result and float(result[0]["value"][1]) >= at_least:
            return
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never reached {expr} >= {at_least}")


def _query(url: str, expr: str) -> dict:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]


@pytest.mark.parametrize("index", range(len(_expressions())))
@pytest.mark.prometheus
@pytest.mark.slow
def test_every_rule_and_dashboard_expression_evaluates_in_prometheus(prometheus, index):
    _, url = prometheus
    _query(url, _expressions()[index])


@pytest.mark.prometheus
@pytest.mark.slow
def test_the_dictionary_variable_lists_the_loaded_dictionaries_and_selects_their_series(prometheus):
    _, url = prometheus
    # Grafana runs label_values(metric, label) as this call
    names = httpx.get(f"{url}/api/v1/label/name/values", params={"match[]": "monosemantic_dictionary_info"}).json()["data"]
    assert names == ["reference"]
    filtered = [(a, b) for a, b in zip(_panel_expressions("reference"), _panel_expressions("nonesuch")) if a != b]
    assert len(filtered) >= 7
    for loaded, unknown in filtered:
        assert _query(url, loaded)["result"], loaded
        assert _query(url, unknown)["result"] == [], unknown


def _scraped(url: str, expr: str) -> float:
    result = _query(url, expr)["result"]
    return float(result[0]["value"][1]) if result else -1.0


@pytest.mark.prometheus
@pytest.mark.slow
def test_prometheus_holds_the_watched_feature_counts_the_service_exports(prometheus):
    service, url = prometheus
    metrics = httpx.get(f"{service.http_url}/metrics").text
    pattern = r'monosemantic_watched_feature_fires_total\{dictionary="reference",dictionary_version="1",feature="3329",name="def"\} (\S+)'
    expected = float(re.search(pattern, metrics).group(1))
    assert expected >= 6  # three activations and three observes, each with a `def`
    deadline = time.time() + 20
    while time.time() < deadline and _scraped(url, 'monosemantic_watched_feature_fires_total{feature="3329"}') != expected:
        time.sleep(0.5)
    assert _scraped(url, 'monosemantic_watched_feature_fires_total{feature="3329"}') == expected
    assert _scraped(url, 'sum(rate(monosemantic_observed_tokens_total[1m]))') > 0


@pytest.mark.prometheus
@pytest.mark.slow
def test_prometheus_loaded_every_alert_and_evaluates_them_without_errors(prometheus):
    _, url = prometheus
    deadline = time.time() + 20
    while time.time() < deadline:
        groups = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") and rule["health"] == "ok" for rule in rules):
            break
        time.sleep(0.5)
    assert len(rules) == 6
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = {rule["name"] for rule in rules if rule["state"] != "inactive"}
    assert "MonosemanticNotReady" not in firing and "MonosemanticErrorRatioHigh" not in firing
