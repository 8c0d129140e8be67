"""Provenance recorded with every artifact and results file: the source commit and the versions
of the libraries that computed it, so a number can be traced to the code that produced it."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "onnx", "onnxruntime", "numpy")


def source_commit() -> str | None:
    """The git commit of this source tree (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries an artifact depends on (missing ones left out)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
