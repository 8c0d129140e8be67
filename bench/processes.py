"""Stopping the server processes that the bench scripts (serving, cold_start, oip, abuse) and
the tests' live servers start."""

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
