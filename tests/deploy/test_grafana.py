"""The provisioned Grafana dashboard: structure, and every query on existing metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, SERIES, load_yaml, metric_names

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rcegate.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _as_promql(expr: str) -> str:
    """Replace Grafana's variables with values PromQL accepts."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_the_data_source_the_dashboard_uses_is_provisioned(dashboard: dict[str, Any]) -> None:
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}


def test_the_dashboard_provider_points_where_compose_mounts_the_json() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "rcegate.yml")
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    mounts = {
        v["target"]: v["source"]
        for v in compose["services"]["grafana"]["volumes"]
        if isinstance(v, dict)
    }
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == "./deploy/grafana/dashboards"


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, panel["title"]
        cells |= area


def test_every_query_reads_only_metrics_the_service_exports(dashboard: dict[str, Any]) -> None:
    exprs = _exprs(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= SERIES, (expr, names - SERIES)


def test_every_query_parses_as_promql(
    dashboard: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    # promtool has no stand-alone expression parser; recording rules make it parse each one.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": _as_promql(expr)}
                    for i, expr in enumerate(_exprs(dashboard))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_variables_used_are_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {
        m for e in _exprs(dashboard) for m in re.findall(r"\$(\w+)", e) if not m.startswith("__")
    }
    assert used <= defined
    for variable in dashboard["templating"]["list"]:
        assert metric_names(variable["definition"]) <= SERIES


@pytest.mark.parametrize(
    ("title_word", "metric"),
    [
        ("Accepted vs rejected", "rcegate_images_total"),
        ("Rejection ratio vs target_fpr", "rcegate_target_fpr"),
        ("Detection score", "rcegate_detection_score_bucket"),
        ("latency percentiles", "rcegate_http_request_duration_seconds_bucket"),
        ("Batch size", "rcegate_batch_size_count"),
        ("per class", "rcegate_images_total"),
    ],
)
def test_the_panels_the_issue_asks_for_exist(
    dashboard: dict[str, Any], title_word: str, metric: str
) -> None:
    matches = [p for p in _panels(dashboard) if title_word.lower() in p["title"].lower()]
    assert matches, title_word
    assert any(metric in t["expr"] for p in matches for t in p["targets"])


def test_the_score_distribution_is_a_heatmap_of_histogram_buckets(
    dashboard: dict[str, Any],
) -> None:
    (panel,) = [p for p in _panels(dashboard) if "Detection score" in p["title"]]
    assert panel["type"] == "heatmap"
    assert panel["targets"][0]["format"] == "heatmap"
    assert "by (le)" in panel["targets"][0]["expr"]
