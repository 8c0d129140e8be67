"""The `rcegate` command as a user meets it: --help shows the defaults in force, a mistake is one
line on stderr (a traceback only with --debug), and a model directory alone is enough to serve."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, TinyArtifact
from tests.service.live import RCEGATE, free_port, live_server


def rcegate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    clean.update({"COLUMNS": "200", "TERM": "dumb", **env})
    return subprocess.run(
        [str(RCEGATE), *args], capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120
    )


def test_serve_help_shows_the_built_in_defaults() -> None:
    result = rcegate("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Port of `rcegate serve`. [RCEGATE_PORT; now: 8000]" in text
    assert "[RCEGATE_HOST; now: 127.0.0.1]" in text
    assert "[RCEGATE_MODE; now: annotate]" in text
    assert "[RCEGATE_DEFAULT_MODEL; now: mnist-rce if loaded, else the first loaded name]" in text


def test_serve_help_shows_a_default_set_in_the_environment() -> None:
    result = rcegate("serve", "--help", RCEGATE_PORT="9123", RCEGATE_MODE="enforce")
    text = " ".join(result.stdout.split())
    assert "[RCEGATE_PORT; now: 9123 (from RCEGATE_PORT)]" in text
    assert "[RCEGATE_MODE; now: enforce (from RCEGATE_MODE)]" in text


def test_help_is_plain_text_wrapped_to_the_terminal() -> None:
    for args in (["--help"], ["serve", "--help"], ["train", "--help"]):
        result = rcegate(*args, COLUMNS="100")
        assert result.returncode == 0, args
        assert "<bool>" not in result.stdout and "╭" not in result.stdout, args
        assert "--install-completion" not in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= 100, args
    commands = rcegate("--help", COLUMNS="100").stdout.split("Commands:")[1].splitlines()
    # one line per command: a help text that runs on is cut, never continued on a ragged line
    assert all(re.match(r"  [a-z-]+ +\S", line) for line in commands if line.strip())


def test_a_missing_checkpoint_is_one_line_and_a_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = rcegate("calibrate", "--checkpoint", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: no such checkpoint (--debug shows the traceback)"
    ]
    debug = rcegate("--debug", "calibrate", "--checkpoint", str(missing))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().endswith(f"FileNotFoundError: {missing}: no such checkpoint")


def test_a_bad_depth_is_one_line_before_any_data_is_loaded() -> None:
    result = rcegate("train", "--depth", "7", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Invalid value for --depth: must be 6n+2 (20, 32, 56, ...), got 7 "
        "(--help lists the options)"
    ]


def test_an_unknown_option_and_an_invalid_setting_are_one_line() -> None:
    unknown = rcegate("serve", "--bogus")
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert unknown.stderr.startswith("error: No such option: --bogus")
    invalid = rcegate("serve", "--port", "99999")
    assert invalid.returncode == 2
    assert invalid.stderr.strip().splitlines() == [
        "error: invalid settings: --port: Input should be less than or equal to 65535 (got 99999)"
    ]


def test_an_invalid_setting_from_the_environment_names_the_variable() -> None:
    invalid = rcegate("serve", RCEGATE_PORT="99999")
    assert invalid.returncode == 2
    assert invalid.stderr.strip().splitlines() == [
        "error: invalid settings: RCEGATE_PORT: Input should be less than or equal to 65535 "
        "(got '99999')"
    ]
    not_json = rcegate("serve", RCEGATE_API_KEYS="not json")
    assert not_json.returncode == 2
    assert not_json.stderr.strip().splitlines() == [
        "error: invalid settings: RCEGATE_API_KEYS: cannot be parsed "
        "(Expecting value: line 1 column 1 (char 0))"
    ]


def test_a_missing_model_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    result = rcegate("serve", "--model-dir", str(missing), "--port", "0", "--grpc-port", "0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: model directory {missing} does not exist (--model-dir)"
    ]
    from_env = rcegate("serve", "--port", "0", "--grpc-port", "0", RCEGATE_MODEL_DIR=str(missing))
    assert from_env.stderr.strip().endswith("does not exist (RCEGATE_MODEL_DIR)")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def test_a_port_in_use_is_one_line_naming_which(busy_port: int) -> None:
    free = str(free_port())
    http = rcegate("serve", "--port", str(busy_port), "--grpc-port", "0")
    assert http.returncode == 1
    assert http.stderr.strip().splitlines() == [
        f"error: the HTTP port {busy_port} on 127.0.0.1 is in use (--port)"
    ]
    grpc = rcegate("serve", "--port", free, RCEGATE_GRPC_PORT=str(busy_port))
    assert grpc.returncode == 1
    assert grpc.stderr.strip().splitlines() == [
        f"error: the gRPC port {busy_port} on 127.0.0.1 is in use (RCEGATE_GRPC_PORT)"
    ]
    both = rcegate("serve", "--port", free, "--grpc-port", free)
    assert both.returncode == 1
    assert (
        both.stderr.strip()
        == f"error: the HTTP and gRPC ports are both {free} (--port, --grpc-port)"
    )


def test_a_server_that_cannot_bind_stops_loading_models(busy_port: int) -> None:
    # uvicorn's own start-up (no check before it): the bind fails after loading began.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    done = subprocess.run(
        [str(RCEGATE.with_name("uvicorn")), "service.app:create_app", "--factory",
         "--port", str(busy_port)],
        capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "address already in use" in log
    after = log.split("Application shutdown complete")[1]
    assert "loaded model" not in after and "default model" not in after


def test_every_option_of_every_command_has_help() -> None:
    import typer.main

    from rcegate.cli import app

    command = typer.main.get_command(app)
    missing = [
        f"{name} {param.name}"
        for name, sub in command.commands.items()  # type: ignore[attr-defined]
        for param in sub.params
        if not getattr(param, "help", None)
    ]
    assert missing == []


def test_a_model_dir_alone_serves_its_model_as_the_default(
    tiny_artifact: TinyArtifact, tmp_path: Path, digit_png: bytes
) -> None:
    with live_server(tmp_path / "server.log", "--model-dir", str(tiny_artifact.model_dir)) as live:
        response = httpx.post(
            f"{live.url}/v1/predict", files={"files": ("digit.png", digit_png)}, timeout=30
        )
        assert response.status_code == 200
        assert response.json()["model"] == tiny_artifact.name
        models = httpx.get(f"{live.url}/v1/models", timeout=10).json()["models"]
        assert [m["default"] for m in models] == [True]
    assert "default model: tiny" in (tmp_path / "server.log").read_text()


def test_serve_checks_name_where_each_value_came_from(
    tmp_path: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks of `rcegate serve`, in process (the real command is tested above).
    from pydantic import ValidationError

    from service import cli
    from service.settings import Settings

    for variable in [v for v in os.environ if v.startswith("RCEGATE_")]:
        monkeypatch.delenv(variable)
    settings = Settings(model_dir=tmp_path, port=busy_port, grpc_port=0)
    with pytest.raises(cli.ServeError, match=rf"HTTP port {busy_port} .* in use \(--port\)"):
        cli._check(settings, {"port": busy_port})
    with pytest.raises(cli.ServeError, match=r"does not exist \(the default; set --model-dir"):
        cli._check(Settings(model_dir=tmp_path / "no"), {})
    monkeypatch.setenv("RCEGATE_GRPC_PORT", str(busy_port))
    with pytest.raises(cli.ServeError, match=r"gRPC port .* in use \(RCEGATE_GRPC_PORT\)"):
        cli._check(Settings(model_dir=tmp_path, port=0), {})
    with pytest.raises(ValidationError) as invalid:
        Settings(mode="strict")  # type: ignore[arg-type]
    assert cli._settings_error(invalid.value, {"mode": "strict"}).startswith("--mode: Input")
    assert cli._settings_error(invalid.value, {}).startswith("--mode or RCEGATE_MODE: Input")
