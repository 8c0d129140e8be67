"""bench/gpu_check.sh on a machine without CUDA: it must fail loudly, never benchmark the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_fails_loudly_when_cuda_falls_back_to_cpu(tmp_path: Path) -> None:
    report = tmp_path / "gpu-check.json"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--duration", "1", "--json", str(report)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: CUDA is not in use (it fell back to CPU)" in done.stderr
    assert "raw ONNX Runtime fell back to CPU: session providers ['CPUExecutionProvider']" in (
        done.stderr
    )
    assert "the service (RCEGATE_PROVIDERS=cuda) did not start on CUDA" in done.stderr
    # It stops before measuring anything on the CPU.
    assert "images/s" not in done.stdout and "requests/s" not in done.stdout
    assert not report.exists()
