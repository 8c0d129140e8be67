"""Scaling on rcegate's queue (deploy/k8s/queue-scaling): the HPA overlay against the Kubernetes
schemas, the prometheus-adapter rules against the adapter's own configuration schema, their
queries through promtool (syntax and a unit test of what they compute), and the names that tie
the HPA, the adapter and the metrics the service exports together."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, SERIES, load_yaml, metric_names
from tests.deploy.test_k8s import KUBERNETES_VERSION

K8S = DEPLOY / "k8s"
QUEUE = K8S / "queue-scaling"
ADAPTER = QUEUE / "prometheus-adapter-config.yaml"
ADAPTER_SCHEMA = Path(__file__).parent / "schemas" / "prometheus-adapter-config.schema.json"
# What the adapter substitutes into a metricsQuery when the HPA asks for pods of a namespace.
LABEL_MATCHERS = 'namespace="prod",pod=~"rcegate-a|rcegate-b"'


def _patched(base: Any, patch: Any) -> Any:
    """kustomize's strategic merge for an HPA: maps merge; its lists (metrics) have no merge
    key, so a patch's list replaces the base's."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _patched(base[k], v) if k in base else v for k, v in patch.items()}}
    return patch


def _base_hpa() -> dict[str, Any]:
    assert "hpa.yaml" in load_yaml(K8S / "kustomization.yaml")["resources"]
    return load_yaml(K8S / "hpa.yaml")


def _hpa() -> dict[str, Any]:
    overlay = load_yaml(QUEUE / "kustomization.yaml")
    assert overlay["resources"] == ["../"]
    (patch_ref,) = overlay["patches"]
    patch = load_yaml(QUEUE / patch_ref["path"])
    merged: dict[str, Any] = _patched(copy.deepcopy(_base_hpa()), patch)
    return merged


def _adapter_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(load_yaml(ADAPTER)["data"]["config.yaml"])
    return config


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(ADAPTER_SCHEMA.read_text()))


def _rendered(rule: dict[str, Any]) -> str:
    """The rule's metricsQuery as the adapter sends it to Prometheus for pods."""
    series = rule["name"]["matches"].strip("^$")
    query: str = rule["metricsQuery"]
    for key, value in {"Series": series, "LabelMatchers": LABEL_MATCHERS, "GroupBy": "pod"}.items():
        query = query.replace(f"<<.{key}>>", value)
    assert "<<" not in query, query
    return query


def test_the_overlay_hpa_matches_the_kubernetes_schema() -> None:
    hpa = _hpa()
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    base = _base_hpa()
    assert hpa["spec"]["scaleTargetRef"] == base["spec"]["scaleTargetRef"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        base["spec"]["minReplicas"],
        base["spec"]["maxReplicas"],
    )
    kinds = [metric["type"] for metric in hpa["spec"]["metrics"]]
    assert kinds.count("Pods") == 2 and "Resource" in kinds  # queue metrics, and CPU kept


def test_the_adapter_configmap_matches_the_kubernetes_schema() -> None:
    kubernetes_validate.validate(load_yaml(ADAPTER), KUBERNETES_VERSION, strict=True)


def test_the_adapter_rules_match_the_adapters_config_schema() -> None:
    config = _adapter_config()
    errors = [error.message for error in _validator().iter_errors(config)]
    assert not errors
    broken = copy.deepcopy(config)
    broken["rules"][0]["metricQuery"] = broken["rules"][0].pop("metricsQuery")  # a typo
    assert list(_validator().iter_errors(broken))


def test_the_hpa_asks_for_exactly_the_metrics_the_adapter_serves() -> None:
    asked = {
        metric["pods"]["metric"]["name"]
        for metric in _hpa()["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    rules = _adapter_config()["rules"]
    assert asked == {rule["name"]["as"] for rule in rules}
    for rule in rules:
        # Per pod: the adapter maps the series' namespace and pod labels to those resources.
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        # Only series the service really exports (tests/deploy/conftest.py's agreed names).
        used = metric_names(rule["seriesQuery"]) | metric_names(_rendered(rule))
        assert used and used <= SERIES, used - SERIES
        assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])


def _rules_file(tmp_path: Path) -> Path:
    """The rendered adapter queries as recording rules `rcegate:adapter:<metric>`."""
    rules = [
        {"record": f"rcegate:adapter:{rule['name']['as']}", "expr": _rendered(rule)}
        for rule in _adapter_config()["rules"]
    ]
    path = tmp_path / "adapter-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    return path


def test_the_adapter_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [promtool, "check", "rules", str(_rules_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("pod_b_idle", [False, True], ids=["busy", "idle"])
def test_the_adapter_queries_compute_the_mean_wait_and_depth_per_pod(
    promtool: str, tmp_path: Path, pod_b_idle: bool
) -> None:
    """Pod a: two models, 0.3 s and 0.1 s of wait over 10 requests each per 15 s, so a mean
    wait of 20 ms, and 3 + 5 images queued; pod b: 40 ms, or no traffic (0, not NaN)."""
    rules = _rules_file(tmp_path)
    b_wait = "0+0x20" if pod_b_idle else "0+0.4x20"
    b_count = "0+0x20" if pod_b_idle else "0+10x20"
    series = {
        'rcegate_queue_wait_seconds_sum{namespace="prod",pod="rcegate-a",model="m1"}': "0+0.3x20",
        'rcegate_queue_wait_seconds_count{namespace="prod",pod="rcegate-a",model="m1"}': "0+10x20",
        'rcegate_queue_wait_seconds_sum{namespace="prod",pod="rcegate-a",model="m2"}': "0+0.1x20",
        'rcegate_queue_wait_seconds_count{namespace="prod",pod="rcegate-a",model="m2"}': "0+10x20",
        'rcegate_queue_wait_seconds_sum{namespace="prod",pod="rcegate-b",model="m1"}': b_wait,
        'rcegate_queue_wait_seconds_count{namespace="prod",pod="rcegate-b",model="m1"}': b_count,
        'rcegate_queue_images{namespace="prod",pod="rcegate-a",model="m1",version="1"}': "3x20",
        'rcegate_queue_images{namespace="prod",pod="rcegate-a",model="m2",version="1"}': "5x20",
        'rcegate_queue_images{namespace="prod",pod="rcegate-b",model="m1",version="1"}': "0x20",
        'rcegate_queue_images{namespace="other",pod="rcegate-a",model="m1",version="1"}': "99x20",
    }
    wait = "rcegate:adapter:rcegate_queue_wait_seconds_average"
    b_mean_ms = 0 if pod_b_idle else 40
    depth = "rcegate:adapter:rcegate_queue_images"
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {
                        # In whole milliseconds: the division is exact only up to rounding.
                        "expr": f"round(1000 * {wait})",
                        "eval_time": "4m",
                        "exp_samples": [
                            {"labels": '{pod="rcegate-a"}', "value": 20},
                            {"labels": '{pod="rcegate-b"}', "value": b_mean_ms},
                        ],
                    },
                    {
                        "expr": depth,
                        "eval_time": "4m",
                        "exp_samples": [
                            {"labels": f'{depth}{{pod="rcegate-a"}}', "value": 8},
                            {"labels": f'{depth}{{pod="rcegate-b"}}', "value": 0},
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "adapter-test.yml"
    test_file.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
