"""The model repository on disk: `<model_dir>/<name>/<version>/` and the one walker over it.

A version directory has a numeric name and holds `model.onnx` plus `manifest.json`. Every
reader of the repository (the service's loader, the Triton converter, the benchmarks, the
tests) finds versions here, so "which versions are there" and "which is the newest" have one
answer. Entries whose name starts with a dot are staging leftovers of an atomic write
(`models.files`) and never count.
"""

from __future__ import annotations

from pathlib import Path

from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file

# The repository that ships with the project: this package's own directory.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent


class ArtifactError(Exception):
    """A version is missing, incomplete, or does not match its manifest."""


def _is_version(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit()


def version_directories(model_dir: Path) -> list[Path]:
    """Every `<name>/<version>/` directory under `model_dir`, by name then version number."""
    found = [
        path
        for path in model_dir.glob("*/*")
        if _is_version(path) and not path.parent.name.startswith(".")
    ]
    return sorted(found, key=lambda p: (p.parent.name, int(p.name)))


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
