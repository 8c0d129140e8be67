"""Open-loop HTTP load at a fixed arrival rate, for the overload run of bench/serving.py.

wrk is closed-loop (each connection waits for its answer before sending again), so it cannot offer
"2x the saturation rate"; wrk2 would, but it is not in Debian. This generator schedules request k
at start + k / rate whatever the server does, sends it on an idle keep-alive connection (opening a
new one, up to `--connections`, when none is idle; queueing it client-side when all are busy) and
records each response's status and latency from the moment its bytes were written, which is what
wrk measures too. How late the sends were against the schedule is reported as `lag`, so a
generator that could not keep up (or a server that holds every connection) is visible rather
than hidden. One JSON object goes to stdout.

    python bench/openloop.py --port 8000 --rate 1000 --duration 5 a.png b.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections import deque
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def parse_response(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes used, keep-alive) of the complete HTTP/1.1 response at the start of
    `buffer`, or None while it is incomplete. Bodies by Content-Length or chunked."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    status_line, *lines = bytes(buffer[:head_end]).lower().split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip()] = value.strip()
    end = head_end + 4
    if headers.get(b"transfer-encoding") == b"chunked":
        while True:
            line_end = buffer.find(b"\r\n", end)
            if line_end < 0:
                return None
            chunk = int(bytes(buffer[end:line_end]).split(b";")[0], 16)
            end = line_end + 2 + chunk + 2  # no trailers
            if len(buffer) < end:
                return None
            if chunk == 0:
                break
    else:
        end += int(headers.get(b"content-length", b"0"))
        if len(buffer) < end:
            return None
    return int(status_line.split()[1]), end, headers.get(b"connection") != b"close"


class Generator:
    def __init__(self, host: str, port: int, requests: list[bytes], connections: int) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.max_connections = connections
        self.loop = asyncio.get_running_loop()
        self.idle: list[Connection] = []
        self.open = 0
        self.backlog: deque[float] = deque()  # scheduled times of requests not yet sent
        self.sent = 0
        self.next_request = 0
        self.latency: dict[str, list[float]] = {"ok": [], "refused_503": [], "other": []}
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.lag: list[float] = []
        self.window_end = float("inf")
        self.ok_in_window = 0
        self.outstanding = 0
        self.drained = asyncio.Event()

    def schedule(self, due: float) -> None:
        self.backlog.append(due)
        if self.idle:
            self.send(self.idle.pop())
        elif self.open < self.max_connections:
            self.open += 1
            self.loop.create_task(self.connect())

    async def connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.open -= 1
            self.errors += 1

    def send(self, connection: Connection) -> None:
        if not self.backlog:
            self.idle.append(connection)
            return
        due = self.backlog.popleft()
        now = self.loop.time()
        self.lag.append(now - due)
        request = self.requests[self.next_request % len(self.requests)]
        self.next_request += 1
        self.sent += 1
        self.outstanding += 1
        connection.start(request, now)

    def finished(self, connection: Connection, status: int, started: float, reuse: bool) -> None:
        now = self.loop.time()
        self.outstanding -= 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        kind = "ok" if 200 <= status < 300 else "refused_503" if status == 503 else "other"
        self.latency[kind].append(now - started)
        if kind == "ok" and now <= self.window_end:
            self.ok_in_window += 1
        if reuse:
            self.send(connection)
        else:
            connection.close()
        self.check_drained()

    def lost(self, connection: Connection, in_flight: bool) -> None:
        self.open -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if in_flight:
            self.outstanding -= 1
            self.errors += 1
        if self.backlog and self.open < self.max_connections:
            self.open += 1
            self.loop.create_task(self.connect())
        self.check_drained()

    def check_drained(self) -> None:
        if self.outstanding == 0 and self.loop.time() > self.window_end:
            self.drained.set()


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.generator.send(self)

    def start(self, request: bytes, now: float) -> None:
        assert self.transport is not None
        self.started = now
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.started is not None:
            parsed = parse_response(self.buffer)
            if parsed is None:
                return
            status, size, keep_alive = parsed
            del self.buffer[:size]
            started, self.started = self.started, None
            self.generator.finished(self, status, started, reuse=keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self, in_flight=self.started is not None)
        self.started = None


async def run(
    host: str, port: int, bodies: list[bytes], rate: float, duration: float, connections: int
) -> dict[str, Any]:
    requests = [
        b"POST /v1/predict HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body)
        for body in bodies
    ]
    generator = Generator(host, port, requests, connections)
    loop = generator.loop
    total = int(rate * duration)
    start = loop.time() + 0.05
    generator.window_end = start + duration
    k = 0
    while k < total:
        now = loop.time()
        while k < total and start + k / rate <= now:
            generator.schedule(start + k / rate)
            k += 1
        if k < total:
            await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
    await asyncio.sleep(max(0.0, generator.window_end - loop.time()))
    unsent = len(generator.backlog)
    generator.backlog.clear()
    generator.check_drained()
    # Answers to requests already sent count for latency, up to a grace period.
    try:
        await asyncio.wait_for(generator.drained.wait(), timeout=max(2.0, duration))
    except TimeoutError:
        pass
    refused, ok = generator.latency["refused_503"], generator.latency["ok"]
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else ms * value

    return {
        "rate": rate,
        "duration_s": duration,
        "offered": total,
        "sent": generator.sent,
        "unsent": unsent,
        "unanswered": generator.outstanding,
        "errors": generator.errors,
        "statuses": {str(k): v for k, v in sorted(generator.statuses.items())},
        "ok": len(ok),
        "refused_503": len(refused),
        "non_2xx": len(refused) + len(generator.latency["other"]),
        "accepted_images_per_s": generator.ok_in_window / duration,
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "refused_p50_ms": pct(refused, 50),
        "refused_p99_ms": pct(refused, 99),
        "lag_p50_ms": pct(generator.lag, 50),
        "lag_p99_ms": pct(generator.lag, 99),
        "lag_mean_ms": ms * statistics.fmean(generator.lag) if generator.lag else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=256, help="most open connections")
    parser.add_argument("pngs", type=Path, nargs="+", help="bodies, posted in turn")
    args = parser.parse_args()
    bodies = [path.read_bytes() for path in args.pngs]
    result = asyncio.run(
        run(args.host, args.port, bodies, args.rate, args.duration, args.connections)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
