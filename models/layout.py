"""The model repository on disk: `<model_dir>/<name>/<version>/` and the one walker over it.

A version directory has a numeric name and holds `model.onnx` plus `manifest.json`. Every
reader of the repository (the service's loader, the Triton converter, the benchmarks, the
tests) finds versions here, so "which versions are there" and "which is the newest" have one
answer. Entries whose name starts with a dot are staging leftovers of an atomic write
(`models.files`) and never count.

A version is written one way only, on disk as in a request (`parse_version`): ASCII decimal
digits, no leading zero, no sign, separator or space, at most 10 digits (the manifest's bound).
`0002`, `2.0`, `2_0`, ` 2` and other scripts' digits (`٢`, `²`, `①`, which `str.isdigit()`
accepts) never alias version 2. A directory with such a name is `misnamed`: the service refuses
it alone and says why; other names without any digit (`notes`) are not versions at all.
"""

from __future__ import annotations

import re
from pathlib import Path

from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file

# The repository that ships with the project: this package's own directory.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent


# The manifest's bound on a version number (models.manifest.Manifest.version).
MAX_VERSION = 1_000_000_000
_VERSION = re.compile(r"[1-9][0-9]{0,9}")  # [0-9], unlike \d, is ASCII only


class ArtifactError(Exception):
    """A version is missing, incomplete, or does not match its manifest."""


def parse_version(text: str) -> int | None:
    """The version number `text` writes canonically (`2`, `10`), else None (`0002`, `²`, ...)."""
    if _VERSION.fullmatch(text) is None:
        return None
    number = int(text)
    return number if number <= MAX_VERSION else None


def _is_version(path: Path) -> bool:
    return parse_version(path.name) is not None and path.is_dir()


def _candidates(model_dir: Path) -> list[Path]:
    return [
        path
        for path in model_dir.glob("*/*")
        if not path.parent.name.startswith(".") and not path.name.startswith(".")
    ]


def version_directories(model_dir: Path) -> list[Path]:
    """Every `<name>/<version>/` directory under `model_dir`, by name then version number."""
    found = [path for path in _candidates(model_dir) if _is_version(path)]
    return sorted(found, key=lambda p: (p.parent.name, int(p.name)))


def misnamed_version_directories(model_dir: Path) -> list[Path]:
    """Directories under a model that name a version non-canonically (a digit of any script
    in a name that `parse_version` refuses: `0002`, `2.0`, `²`, `v2`), by path."""
    return sorted(
        path
        for path in _candidates(model_dir)
        if parse_version(path.name) is None
        and any(c.isnumeric() for c in path.name)
        and path.is_dir()
    )


def versions(model_dir: Path, name: str) -> list[int]:
    """The version numbers of model `name`, ascending (numerically: 2 before 10)."""
    return sorted(int(p.name) for p in (model_dir / name).glob("*") if _is_version(p))


def latest_version(model_dir: Path, name: str) -> int:
    """The highest version number of model `name`."""
    found = versions(model_dir, name)
    if not found:
        raise ArtifactError(f"no versions of model {name!r} under {model_dir}")
    return found[-1]


def version_directory(model_dir: Path, name: str, version: int | None = None) -> Path:
    """`<model_dir>/<name>/<version>/`; without a version, the highest one."""
    if version is None:
        version = latest_version(model_dir, name)
    return model_dir / name / str(version)


def identity_mismatch(manifest: Manifest, directory: Path) -> str | None:
    """Why `manifest` does not belong in `directory` (its name and version say otherwise), or
    None when it does."""
    if (manifest.name, str(manifest.version)) == (directory.parent.name, directory.name):
        return None
    return (
        f"manifest says {manifest.name}/{manifest.version}, directory is "
        f"{directory.parent.name}/{directory.name}"
    )


def verified_manifest(directory: Path) -> Manifest:
    """The manifest of a version directory once its files are present, its name and version
    match the directory and `model.onnx` has the manifest's sha256; ArtifactError otherwise."""
    if not (directory / MANIFEST_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        raise ArtifactError(f"{directory} has no {MODEL_FILE} + {MANIFEST_FILE}")
    manifest = Manifest.load(directory)
    mismatch = identity_mismatch(manifest, directory)
    if mismatch is not None:
        raise ArtifactError(f"{directory}: {mismatch}")
    if sha256_file(directory / MODEL_FILE) != manifest.sha256:
        raise ArtifactError(f"{directory / MODEL_FILE} does not match its manifest's sha256")
    return manifest
