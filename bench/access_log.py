"""What the access layer (request id, API-key check, access log) costs per request.

Calls the layer directly over a trivial ASGI app, so only its own work is timed (no sockets, no
model): rounds alternate log off / log on / log on with an API key, and the median of the
rounds' microseconds per request is printed. The access log writes to /dev/null here; its
writer thread still formats and writes every line.

    python bench/access_log.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import statistics
import time

from starlette.types import Receive, Scope, Send

from service.access import ACCESS_LOGGER, AccessLayer, AccessLog, ApiKeys
from service.app import render_error
from service.metrics import Metrics
from service.settings import Settings


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def run(layer: AccessLayer, requests: int, headers: list[tuple[bytes, bytes]]) -> float:
    scope_base = {
        "type": "http",
        "method": "POST",
        "path": "/v1/predict",
        "headers": headers,
        "client": ("10.0.0.1", 5000),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        return None

    start = time.perf_counter()
    for _ in range(requests):
        await layer(dict(scope_base), receive, send)  # type: ignore[arg-type]
    return (time.perf_counter() - start) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(logging.FileHandler("/dev/null"))
    logger.propagate = False
    logger.setLevel(logging.INFO)
    key = "bench-key"
    settings = Settings()
    metrics = Metrics()
    log = AccessLog(metrics, capacity=1_000_000)
    variants = {
        "no log, no keys": (AccessLayer(ok, settings, ApiKeys({}), render_error, None), []),
        "log, no keys": (AccessLayer(ok, settings, ApiKeys({}), render_error, log), []),
        "log, API key": (
            AccessLayer(
                ok,
                settings,
                ApiKeys({"bench": hashlib.sha256(key.encode()).hexdigest()}),
                render_error,
                log,
            ),
            [(b"authorization", f"Bearer {key}".encode())],
        ),
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (layer, headers) in variants.items():
            timings[name].append(asyncio.run(run(layer, args.requests, headers)))
    log.close()
    for name, values in timings.items():
        print(f"{name:>16}: {statistics.median(values):6.1f} us/request (median of {args.rounds})")
    dropped = metrics.registry.get_sample_value("rcegate_access_log_dropped_total")
    print(f"access-log lines dropped: {dropped:.0f}")


if __name__ == "__main__":
    main()
