"""scripts/setup in a copy of the checkout whose .venv is a stub: it installs from the lock,
then, while pyproject.toml and the lock are unchanged, runs no pip at all (scripts/serve's fast
start)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

STUB = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../calls"
"""


def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(STUB)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def setup(root: Path, *args: str) -> list[str]:
    calls = root / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["bash", str(root / "scripts" / "setup"), *args], check=True, timeout=60)
    return calls.read_text().splitlines() if calls.exists() else []


def test_setup_installs_the_service_lock_then_nothing_while_it_is_unchanged(
    tmp_path: Path,
) -> None:
    root = checkout(tmp_path)
    first = setup(root, "service")
    assert "-m pip install -q -r requirements/service-cpu.txt" in first
    assert "-m pip install -q --no-deps -e ." in first
    assert setup(root, "service") == []
    with (root / "requirements" / "service-cpu.txt").open("a") as lock:
        lock.write("# changed\n")
    assert "-m pip install -q -r requirements/service-cpu.txt" in setup(root, "service")


def test_setup_installs_the_dev_lock_and_keeps_an_installed_torch(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    calls = setup(root)
    assert "-m pip install -q -r requirements/dev.txt" in calls
    # the stub answers `python -c 'import torch'` with success: a torch is present and kept
    assert not [call for call in calls if "torch==" in call]
    assert setup(root) == []
