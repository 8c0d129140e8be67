"""The serving benchmark's load generators count statuses right, 503s apart from other non-2xx.

A stub server answers 200, 503 (closing the connection, as uvicorn's concurrency cap does) and
404 (chunked body) in turn; wrk with bench/post_png.lua and bench/openloop.py run against it for
one second each and must see a third of each.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00"
    b":~\x9bU\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND"
    b"\xaeB`\x82"
)


def stub_app() -> Any:
    turn = itertools.count()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        status = (200, 503, 404)[next(turn) % 3]
        headers = [(b"content-type", b"application/json")]
        if status != 404:  # 404 goes out chunked
            headers.append((b"content-length", b"2"))
        if status == 503:
            headers += [(b"retry-after", b"1"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


@pytest.fixture(scope="module")
def stub_port() -> Iterator[int]:
    # Bound and listening before the server thread starts: clients queue in the backlog.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(stub_app(), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("png") / "digit.png"
    path.write_bytes(PNG)
    return path


def thirds(total: int, *counts: int, slack: int) -> bool:
    return all(abs(count - total / 3) <= slack for count in counts)


def test_wrk_script_counts_503_apart_from_other_non_2xx(stub_port: int, png: Path) -> None:
    wrk = shutil.which("wrk")
    # Never skipped: scripts/test installs Debian's wrk, so a missing one is a broken setup.
    assert wrk is not None, "wrk is not installed (scripts/test or bench/setup installs it)"
    url = f"http://127.0.0.1:{stub_port}/v1/predict"
    command = [wrk, "-t", "1", "-c", "4", "-d", "1s", "-s", str(BENCH / "post_png.lua")]
    done = subprocess.run(
        [*command, url, "--", str(png)], capture_output=True, text=True, timeout=30, check=True
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK_JSON "))
    got = json.loads(line.removeprefix("WRK_JSON "))
    assert got["ok"] + got["non_2xx"] == got["requests"] > 30
    other = got["non_2xx"] - got["refused_503"]
    assert thirds(got["requests"], got["ok"], got["refused_503"], other, slack=4), got


def test_openloop_counts_statuses_and_reads_chunked_bodies(stub_port: int, png: Path) -> None:
    command = [sys.executable, str(BENCH / "openloop.py"), "--port", str(stub_port)]
    command += ["--rate", "90", "--duration", "1", str(png)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    got = json.loads(done.stdout)
    assert got["errors"] == got["unanswered"] == 0, got
    assert got["sent"] + got["unsent"] == got["offered"] == 90
    assert sum(got["statuses"].values()) == got["sent"]
    statuses = [got["statuses"].get(s, 0) for s in ("200", "503", "404")]
    assert thirds(got["sent"], *statuses, slack=1), got
    assert (got["ok"], got["refused_503"]) == (statuses[0], statuses[1])
    assert got["non_2xx"] == statuses[1] + statuses[2]
    assert got["refused_p99_ms"] is not None
