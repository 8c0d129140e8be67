"""Installs are quiet: scripts/setup (and so scripts/serve) installs the package without
setuptools' editable-install banner, which it would otherwise print on every install."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.scripts.test_setup import checkout

STUB = """#!/bin/sh
echo "PYTHONWARNINGS=$PYTHONWARNINGS $@" >> "$(dirname "$0")/../calls"
"""


def editable_install_line() -> str:
    lines = (ROOT / "scripts" / "setup").read_text().splitlines()
    line = next(line for line in lines if "-e ." in line)
    return line.strip()


def test_setup_installs_the_package_with_warnings_silenced(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    (root / ".venv" / "bin" / "python").write_text(STUB)
    subprocess.run(["bash", str(root / "scripts" / "setup"), "service"], check=True, timeout=60)
    calls = (root / ".venv" / "calls").read_text().splitlines()
    assert "PYTHONWARNINGS=ignore -m pip install -q --no-deps -e ." in calls
    # the dependencies' install keeps the user's warning settings
    assert "PYTHONWARNINGS= -m pip install -q -r requirements/service-cpu.txt" in calls


@pytest.mark.slow
def test_the_editable_install_of_scripts_setup_prints_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # as scripts/setup does first: a current pip shows what the build backend prints
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    command = editable_install_line().replace("python", str(venv / "bin" / "python"), 1)
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    # pip's own notes about the machine's index configuration are not ours to silence
    ours = [x for x in done.stderr.splitlines() if not re.match(r"WARNING: Location '", x)]
    assert ours == [] and done.stdout == ""
