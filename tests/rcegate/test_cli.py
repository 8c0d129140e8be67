"""Assembling the `rcegate` command from the `rcegate.commands` entry-point group: a stage that
is not installed is left out, a stage that is broken is an error, and an install without the
training stage (the container image) lists the service's and the repository's commands only."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import typer
import typer.main

import rcegate.cli
from tests.conftest import ROOT

SERVICE_COMMANDS = ["api-key", "export-triton", "keygen", "serve", "sign"]


def commands(app: typer.Typer) -> list[str]:
    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def with_group(monkeypatch: pytest.MonkeyPatch, *values: str) -> None:
    members = [EntryPoint(f"stage{i}", value, rcegate.cli.GROUP) for i, value in enumerate(values)]
    monkeypatch.setattr(rcegate.cli, "entry_points", lambda group: members)


def test_every_installed_stage_adds_its_commands() -> None:
    assert {"serve", "export-triton", "train", "export", "sign"} <= set(commands(rcegate.cli.app))


def test_a_stage_that_is_not_installed_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with_group(monkeypatch, "not_installed_stage.cli:register", "service.cli:register")
    assert rcegate.cli.load_commands(typer.Typer()) == ["stage1"]
    assert commands(rcegate.cli.build_app()) == ["serve"]


def test_a_stage_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stage is there, but a module it imports is not: a bug to report, not to hide.
    with_group(monkeypatch, "service.not_a_module:register")
    with pytest.raises(ModuleNotFoundError, match="service.not_a_module"):
        rcegate.cli.load_commands(typer.Typer())


# Run as the container image is: the `training` package and torch cannot be imported.
WITHOUT_TRAINING = """
import importlib.abc, json, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("training", "torch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
import typer.main, rcegate.cli
print(json.dumps(sorted(typer.main.get_command(rcegate.cli.app).commands)))
"""


def test_without_the_training_stage_only_service_commands_are_listed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAINING],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == SERVICE_COMMANDS


def test_python_m_rcegate_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rcegate", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"COLUMNS": "200", "TERM": "dumb", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "export-triton" in done.stdout and "train" in done.stdout
