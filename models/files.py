"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

Everything that writes into the repository (checkpoints, reports, artifacts, Triton model
repositories, sample images) stages its output beside the destination, on the same file system,
and renames it into place. A crash, a full disk or a Ctrl-C leaves the old content (or nothing)
and at most a hidden staging entry, never half a file that a reader would take for the real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, the file
    written there replaces `path` (with permissions `mode`). On an error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(mode)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically."""
    with staged_file(path, mode) as staging:
        staging.write_bytes(data)


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"), mode)


@contextmanager
def staged_directory(destination: Path, mode: int = 0o755) -> Iterator[Path]:
    """Yield an empty temporary directory beside `destination`; when the block ends without an
    error it takes the place of `destination` (an existing one is moved aside and removed only
    after the new one is in place). On an error the staging directory is removed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        staging.chmod(mode)
        old = destination.with_name(f".{destination.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if destination.exists():
            os.replace(destination, old)
        os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
