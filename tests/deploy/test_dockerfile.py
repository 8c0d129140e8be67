"""The Dockerfile and .dockerignore, read as text (the container test builds and runs it)."""

from __future__ import annotations

import json
import re

from tests.deploy.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_the_base_image_is_an_argument_defaulting_to_python_slim() -> None:
    assert _instructions()[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [arg for op, arg in _instructions() if op == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)


def test_the_default_build_is_the_gpu_variant() -> None:
    assert ("ARG", "ORT_VARIANT=gpu") in _instructions()


def test_the_final_stage_runs_non_root_with_an_exec_form_command() -> None:
    final = dict(_final_stage())
    user = final["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    command = json.loads(final["CMD"])
    assert command[:2] == ["rcegate", "serve"]
    assert "RCEGATE_HOST=0.0.0.0" in final["ENV"] and "RCEGATE_PORT=8000" in final["ENV"]


def test_the_healthcheck_asks_the_ready_endpoint_without_curl() -> None:
    (healthcheck,) = [arg for op, arg in _final_stage() if op == "HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0].startswith("python")
    assert "/health/ready" in command[-1]
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_the_final_stage_copies_only_the_venv_the_wheel_and_the_default_model() -> None:
    copies = [arg for op, arg in _final_stage() if op == "COPY"]
    assert copies == [
        "--from=build /opt/venv /opt/venv",
        "--from=build /wheels /tmp/wheels",
        "models/mnist-rce/ /models/mnist-rce/",
    ]
    assert "torch" not in DOCKERFILE.split("FROM ${BASE_IMAGE} AS runtime")[1]


def test_the_build_context_leaves_out_training_tests_and_the_venv() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert not allowed & {"training", "tests", ".venv", ".git", "runs"}
    assert {"rcegate", "service", "models", "pyproject.toml"} <= allowed
