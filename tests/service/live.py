"""`rcegate serve` in its own process on a free loopback port, for tests of the real server
(`live_server(log, "--workers", "2")` for several worker processes behind the port)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.processes import stop
from tests.conftest import ROOT

STARTUP_TIMEOUT = 60.0
RCEGATE = Path(sys.executable).with_name("rcegate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Live:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples on /metrics whose labels contain `labels` (e.g.
        'status="499"'); 0 when there is no such series yet."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
            if labels in (match.group(1) or ""):
                total += float(match.group(2))
        return total

    def worker_pids(self) -> list[int]:
        """The worker processes of `rcegate serve --workers N` (spawned children of the
        supervisor; its other child, multiprocessing's resource tracker, excluded)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [
            int(child)
            for child in children
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        ]

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident set size (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling interval, not an assertion
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT}s:\n{log.read_text()}")


@contextmanager
def live_server(log: Path, *args: str, **env: str) -> Iterator[Live]:
    """Start `rcegate serve` with extra CLI args and RCEGATE_* settings; stop it afterwards."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    clean["RCEGATE_GRPC_PORT"] = "0"  # unless a test asks: never collide on the default port
    clean.update({f"RCEGATE_{k.upper()}": v for k, v in env.items()})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(RCEGATE), "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean,
            cwd=ROOT,
        )
    host = env.get("host", "127.0.0.1")  # an IPv6 host (`::1`) is bracketed in the URL
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        wait_ready(url, process, log)
        yield Live(url, port, process, log)
    finally:
        if process.poll() is None:
            stop(process)
