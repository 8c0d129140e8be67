"""The pinned installs in requirements/ (written by scripts/lock) against pyproject.toml: every
dependency pinned at a version pyproject allows, no torch or CUDA libraries where they must not
be, and the setup script and the Dockerfile installing from them."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = {
    "service-cpu.txt": ("cpu",),
    "service-gpu.txt": ("gpu",),
    "dev.txt": ("cpu", "train", "dev"),
}


def pins(lock: str) -> dict[str, Version]:
    text = (ROOT / "requirements" / lock).read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)
    return {canonicalize_name(name): Version(version) for name, version in found}


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_pinned_at_a_version_pyproject_allows(lock: str) -> None:
    pinned = pins(lock)
    wanted = [*PROJECT["dependencies"]]
    for extra in LOCKS[lock]:
        wanted += PROJECT["optional-dependencies"][extra]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch":  # installed by scripts/setup itself (RCEGATE_TORCH)
            continue
        assert name in pinned, f"{lock}: {name} is not pinned; run bash scripts/lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock}: {name}=={pinned[name]} does not satisfy {requirement}; run bash scripts/lock"
        )


def test_the_service_locks_hold_no_torch_and_the_dev_lock_no_cuda_libraries() -> None:
    for lock in LOCKS:
        assert "torch" not in pins(lock), lock
    assert not [name for name in pins("dev.txt") if name.startswith("nvidia-")]
    assert not [name for name in pins("service-cpu.txt") if name.startswith("nvidia-")]
    assert [name for name in pins("service-gpu.txt") if name.startswith("nvidia-")]


def test_setup_and_the_dockerfile_install_from_the_locks() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "lock=requirements/service-cpu.txt" in setup and "lock=requirements/dev.txt" in setup
    assert 'pip install -q -r "$lock"' in setup
    assert "--no-deps -e ." in setup
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements/service-${ORT_VARIANT}.txt /tmp/requirements.txt" in dockerfile
    assert "!requirements/" in (ROOT / ".dockerignore").read_text().splitlines()
