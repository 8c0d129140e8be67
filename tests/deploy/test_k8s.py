"""Kubernetes manifests: validated against the Kubernetes schemas (kubernetes-validate ships
them, so this runs offline) in strict mode, and checked for what the deployment promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import DEPLOY, ROOT, load_yaml, load_yaml_documents

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"


def _base_resources() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_documents(K8S / name)]


def _by_kind(kind: str) -> dict[str, Any]:
    (resource,) = [r for r in _base_resources() if r["kind"] == kind]
    return resource


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize applies it: lists of named objects merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all("name" in p for p in patch):
        merged_list = list(base)
        for item in patch:
            names = [b.get("name") for b in merged_list]
            if item["name"] in names:
                i = names.index(item["name"])
                merged_list[i] = _merge(merged_list[i], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def _gpu_deployment() -> dict[str, Any]:
    overlay = load_yaml(K8S / "gpu" / "kustomization.yaml")
    assert overlay["resources"] == ["../"]
    (patch_ref,) = overlay["patches"]
    patch = load_yaml(K8S / "gpu" / patch_ref["path"])
    merged: dict[str, Any] = _merge(copy.deepcopy(_by_kind("Deployment")), patch)
    return merged


def test_the_kustomization_lists_every_base_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("resource", _base_resources(), ids=lambda r: r["kind"])
def test_base_manifests_match_the_kubernetes_schema(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_gpu_overlay_matches_the_kubernetes_schema() -> None:
    deployment = _gpu_deployment()
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "500m"  # merged, not replaced
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"


def test_the_validator_rejects_a_wrong_field() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_pods_run_non_root_on_a_read_only_root_filesystem() -> None:
    spec = _by_kind("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
        int(user[0]),
        int(user[1]),
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts


def test_probes_hit_the_health_endpoints_on_the_image_port() -> None:
    (container,) = _by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert exposed and set(exposed.group(1).split()) == {"8000", "8001"}
    port = {"name": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_service_and_hpa_point_at_the_deployment() -> None:
    deployment = _by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    target = _by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_prometheus_can_find_the_pods() -> None:
    annotations = _by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = load_yaml(K8S / "optional" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = _by_kind("Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_manifests_parse_as_single_documents() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        assert len(load_yaml_documents(Path(path))) == 1, path


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_the_drain_ends_before_the_orchestrators_kill() -> None:
    """rcegate drains for at most RCEGATE_DRAIN_SECONDS after SIGTERM; Kubernetes and compose
    send SIGKILL after their grace period, so the drain must end well before it."""
    from service.settings import Settings

    deployment = load_yaml(DEPLOY / "k8s" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    drain = float(env.get("RCEGATE_DRAIN_SECONDS", Settings().drain_seconds))
    assert drain + 5 <= pod["terminationGracePeriodSeconds"]
    service = load_yaml(ROOT / "docker-compose.yml")["services"]["rcegate"]
    compose_drain = float(service["environment"].get("RCEGATE_DRAIN_SECONDS", drain))
    assert compose_drain + 5 <= _seconds(service["stop_grace_period"])


def test_the_cpu_deployment_runs_one_worker_per_core_of_its_cpu_limit() -> None:
    """`RCEGATE_WORKERS=auto` in the pod resolves, on CPU, to the cores of the container's CPU
    limit (what `available_cores` reads from the cgroup quota there)."""
    import math

    from service.settings import Settings
    from service.workers import worker_count

    deployment = load_yaml(DEPLOY / "k8s" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    limit = str(container["resources"]["limits"]["cpu"])
    cores = math.ceil(int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit))
    settings = Settings(workers=env["RCEGATE_WORKERS"], providers="cpu")
    assert worker_count(settings, cores=cores) == cores == 2
