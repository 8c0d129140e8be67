"""deploy/kserve/: the InferenceService against KServe's own CRD schema (vendored from KServe
v0.20.0 by scripts/vendor-kserve-schema, offline), with unknown fields refused as kubectl's
strict field validation refuses them, and checked for what the predictor promises: the OIP
endpoints over REST and gRPC on the ports rcegate listens on, probes, and the pod settings of
deploy/k8s/deployment.yaml."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from service.settings import Settings
from tests.deploy.conftest import DEPLOY, ROOT, load_yaml

ISVC = DEPLOY / "kserve" / "inferenceservice.yaml"
SCHEMA = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.schema.json"
KSERVE = "v0.20.0 (commit 1fb781055dd1567164358233e1125142ca6ef1fe)"


def strict(node: Any) -> Any:
    """The schema with unknown fields refused: `additionalProperties: false` on every object
    that lists its properties and does not keep unknown fields (as the API server's strict
    field validation, kubectl's default, reports them)."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    closed = "properties" in out and "additionalProperties" not in out
    if closed and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    assert KSERVE in schema["$comment"]  # where it came from, as scripts/vendor-kserve-schema says
    return jsonschema.Draft7Validator(strict(schema))


def errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def predictor_container(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe gives the model server
    return dict(container)


def test_the_inferenceservice_matches_kserves_crd_schema(
    validator: jsonschema.Draft7Validator,
) -> None:
    isvc = load_yaml(ISVC)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert errors(validator, isvc) == []
    # Only the predictor: the vendored schema keeps KServe's schema for nothing else.
    assert set(isvc["spec"]) == {"predictor"}
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "predictor", "containers", 0, "portz"), []),  # unknown field
        (("spec", "predictor", "minReplicas"), "two"),  # wrong type
        (("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), "http"),
        (("spec", "predictor", "scaleMetric"), "queue"),  # not one of KServe's metrics
    ],
)
def test_the_schema_check_catches_a_wrong_field(
    validator: jsonschema.Draft7Validator, path: tuple[str | int, ...], value: Any
) -> None:
    broken = copy.deepcopy(load_yaml(ISVC))
    node: Any = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(validator, broken)


def test_the_predictor_serves_oip_rest_and_grpc_where_rcegate_listens() -> None:
    isvc = load_yaml(ISVC)
    container = predictor_container(isvc)
    env = {e["name"]: e["value"] for e in container["env"]}
    rest, grpc = container["ports"]
    # KServe's Service sends port 80 to the first port; a port named grpc/h2c is served as h2c.
    assert int(env["RCEGATE_PORT"]) == rest["containerPort"] and rest["name"] == "http1"
    assert int(env["RCEGATE_GRPC_PORT"]) == grpc["containerPort"] and grpc["name"] == "grpc"
    assert Settings(**{k.removeprefix("RCEGATE_").lower(): v for k, v in env.items()})
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
        ("startupProbe", "/v2/health/live"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": rest["containerPort"]}
    # Both ports need a Deployment and a Service of KServe's Standard mode (Knative: one port).
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    annotations = isvc["spec"]["predictor"]["annotations"]
    assert annotations["prometheus.io/port"] == str(rest["containerPort"])


def test_the_predictor_runs_like_the_kubernetes_deployment() -> None:
    isvc = load_yaml(ISVC)
    predictor = isvc["spec"]["predictor"]
    container = predictor_container(isvc)
    deployment = load_yaml(DEPLOY / "k8s" / "deployment.yaml")["spec"]["template"]["spec"]
    (ours,) = deployment["containers"]
    assert container["image"] == ours["image"]
    assert predictor["securityContext"] == deployment["securityContext"]
    assert container["securityContext"] == ours["securityContext"]
    assert container["resources"] == ours["resources"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert predictor["volumes"] == deployment["volumes"]
    # The drain ends before the kill, as in the Deployment.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert float(env["RCEGATE_DRAIN_SECONDS"]) + 5 <= predictor["terminationGracePeriodSeconds"]
    ours_env = {e["name"]: e["value"] for e in ours["env"]}
    assert env["RCEGATE_WORKERS"] == ours_env["RCEGATE_WORKERS"]
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user and predictor["securityContext"]["runAsUser"] == int(user.group(1))
