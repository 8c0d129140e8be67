"""docker-compose.yml and its GPU override: the compose-spec schema plus what the stack needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, load_yaml

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


def _check_jsonschema(*paths: Path) -> subprocess.CompletedProcess[str]:
    # check-jsonschema ships the compose-spec schema, so this works offline.
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_files_match_the_compose_spec_schema() -> None:
    result = _check_jsonschema(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_wrong_field(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    healthcheck: {interval: 3}\n")
    assert _check_jsonschema(broken).returncode != 0


def test_the_service_is_read_only_limited_and_health_checked(compose: dict[str, Any]) -> None:
    service = compose["services"]["rcegate"]
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert service["user"] == "10001:10001"
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["test"][0] == "CMD"
    limits = service["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    (models,) = [v for v in service["volumes"] if v["target"] == "/models"]
    assert models["read_only"] is True
    assert service["environment"]["RCEGATE_MODEL_DIR"] == "/models"


def test_every_bind_mount_source_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict) and volume["type"] == "bind":
                source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume["source"])
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_and_grafana_get_the_repository_config(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (config,) = [v for v in prometheus["volumes"] if isinstance(v, dict)]
    assert (ROOT / config["source"] / "prometheus.yml").is_file()
    grafana = compose["services"]["grafana"]
    targets = {v["target"] for v in grafana["volumes"] if isinstance(v, dict)}
    assert {
        "/etc/grafana/provisioning/datasources",
        "/etc/grafana/provisioning/dashboards",
    } <= targets
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()


def test_the_build_args_are_ones_the_dockerfile_declares(compose: dict[str, Any]) -> None:
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    gpu = load_yaml(COMPOSE_GPU)
    for service in (compose["services"]["rcegate"], gpu["services"]["rcegate"]):
        assert set(service["build"]["args"]) <= declared
    assert compose["services"]["rcegate"]["build"]["args"]["ORT_VARIANT"] == "cpu"


def test_the_gpu_override_builds_the_gpu_image_and_reserves_nvidia_devices() -> None:
    service = load_yaml(COMPOSE_GPU)["services"]["rcegate"]
    assert service["build"]["args"]["ORT_VARIANT"] == "gpu"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
