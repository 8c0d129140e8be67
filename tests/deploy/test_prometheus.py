"""The Prometheus config, recording and alert rules: checked and unit-tested by promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.conftest import DEPLOY, SERIES, load_yaml, metric_names

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "rcegate.yml"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_config_and_its_rule_files(promtool: str) -> None:
    result = _run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(PROMETHEUS / "tests" / "rcegate_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(rcegate_images_total[5m]\n"
    )
    assert _run(promtool, "check", "rules", str(broken)).returncode != 0


def test_rules_use_only_metrics_the_service_exports() -> None:
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    for rule in rules:
        assert metric_names(rule["expr"]) <= SERIES, rule


def test_the_alerts_the_issue_asks_for_exist() -> None:
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert {"RcegateRejectionRatioHigh", "RcegateDown", "RcegateLatencyHigh"} <= set(alerts)
    rejection = alerts["RcegateRejectionRatioHigh"]
    assert "rcegate_target_fpr" in rejection["expr"]
    assert "possible attack or drift" in rejection["annotations"]["summary"]
    assert rejection["for"] in {"5m", "10m", "15m"}


def test_the_scrape_config_targets_the_compose_service() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "rcegate"]
    assert job["static_configs"][0]["targets"] == ["rcegate:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
