"""`models.files`: a write either lands whole under its final name or leaves the old content."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from models.files import staged_directory, staged_file, write_bytes, write_text


def test_write_text_replaces_the_file_and_leaves_no_staging_entry(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.md"
    write_text(path, "first\n")
    write_text(path, "second é\n")
    assert path.read_text(encoding="utf-8") == "second é\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def test_write_bytes_sets_the_requested_mode(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_bytes(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_staged_file_keeps_the_old_content_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), staged_file(path) as staging:
        staging.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_staged_directory_swaps_a_whole_directory_into_place(tmp_path: Path) -> None:
    destination = tmp_path / "samples"
    destination.mkdir()
    (destination / "stale.png").write_bytes(b"old")
    with staged_directory(destination) as staging:
        (staging / "clean-0.png").write_bytes(b"new")
        assert (destination / "stale.png").exists()  # readers still see the old one
    assert sorted(p.name for p in destination.iterdir()) == ["clean-0.png"]
    assert stat.S_IMODE(destination.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]


def test_staged_directory_leaves_the_old_directory_when_the_block_fails(tmp_path: Path) -> None:
    destination = tmp_path / "1"
    destination.mkdir()
    (destination / "model.onnx").write_bytes(b"old")
    with pytest.raises(ValueError), staged_directory(destination) as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise ValueError("bad graph")
    assert (destination / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["1"]
