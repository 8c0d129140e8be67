"""Stopping the server processes the bench scripts start (bench/serving.py, cold_start.py,
oip.py). bench/abuse.py keeps its own copy: the tests import it as `bench.abuse`, and as a
script it must not need the repository root on its path before it parses its arguments."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
