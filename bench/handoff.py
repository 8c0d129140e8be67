"""What it costs to hand a decoded image to a model process and get its answer back, on CPU.

docs/serving.md ("Worker processes") weighs one ONNX Runtime session per worker process against
MLServer's and BentoML's shape: front workers hand decoded float32 tensors to one model process
per GPU, whose one batcher sees all the traffic. This measures the hand-off that shape adds per
request, on the default model at batch 1, side by side in interleaved rounds:

- in-process: `Detector.run_arrays` on the session, as a worker runs it today;
- pipe: the tensor's bytes over a `multiprocessing` pipe to a model process (spawned, with its
  own session), the outputs pickled back;
- shared memory: the tensor written into a shared-memory slot, the pipe carrying only a wake-up
  byte each way, the outputs written back into the slot;
- the same two hand-offs to a process that answers without running the model (echo): the
  transport alone.

The difference between a hand-off row and in-process is the hand-off's cost per request (a
lower bound for a real model process: no event loop, no batcher, one client at a time).

    python bench/handoff.py [--seconds 3] [--rounds 3] [--json bench/results/handoff.json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.results import table, write_result  # noqa: E402

MODEL = ROOT / "models" / "mnist-rce" / "2"
SLOT = 64 * 1024  # bytes of one shared-memory slot: a 28x28 float32 image and its outputs


def _detector() -> Any:
    from service.detector import load_detector

    return load_detector(MODEL, "cpu", 1, 1)


def _answer(run: Callable[[np.ndarray], dict[str, np.ndarray]] | None, x: np.ndarray) -> Any:
    return run(x) if run is not None else {"label": np.zeros(1, np.int64)}


def model_process(conn: Connection, shm_name: str, echo: bool, shape: tuple[int, ...]) -> None:
    """The model process: answers pipe requests (bytes in, pickled outputs out) and
    shared-memory requests (a wake-up byte; tensor and outputs in the slot) until b"".
    Runs in a spawned process (multiprocessing.get_context("spawn"))."""
    run = None if echo else _detector().run_arrays
    shm = SharedMemory(shm_name)
    try:
        while True:
            message = conn.recv_bytes()
            if not message:
                return
            if message == b"s":  # shared memory: the tensor is in the slot
                x = np.ndarray(shape, np.float32, buffer=shm.buf)
                data = pickle.dumps(_answer(run, x.copy()), pickle.HIGHEST_PROTOCOL)
                shm.buf[SLOT - 4 : SLOT] = len(data).to_bytes(4, "little")
                shm.buf[SLOT : SLOT + len(data)] = data
                conn.send_bytes(b"s")
            else:
                x = np.frombuffer(message, np.float32).reshape(shape)
                conn.send_bytes(pickle.dumps(_answer(run, x), pickle.HIGHEST_PROTOCOL))
    finally:
        shm.close()


class Remote:
    """The worker's side of one model process."""

    def __init__(self, echo: bool, shape: tuple[int, ...]) -> None:
        context = multiprocessing.get_context("spawn")
        self.shm = SharedMemory(create=True, size=2 * SLOT)
        self.conn, theirs = context.Pipe()
        self.process = context.Process(
            target=model_process, args=(theirs, self.shm.name, echo, shape), daemon=True
        )
        self.process.start()
        self.shape = shape

    def pipe(self, x: np.ndarray) -> Any:
        self.conn.send_bytes(x.tobytes())
        return pickle.loads(self.conn.recv_bytes())

    def shared(self, x: np.ndarray) -> Any:
        view = np.ndarray(self.shape, np.float32, buffer=self.shm.buf)
        view[...] = x
        self.conn.send_bytes(b"s")
        self.conn.recv_bytes()
        size = int.from_bytes(self.shm.buf[SLOT - 4 : SLOT], "little")
        return pickle.loads(self.shm.buf[SLOT : SLOT + size])

    def close(self) -> None:
        self.conn.send_bytes(b"")
        self.process.join(timeout=10)
        self.shm.close()
        self.shm.unlink()


def timed(call: Callable[[np.ndarray], Any], images: list[np.ndarray], seconds: float) -> float:
    """Median microseconds per call over `seconds`."""
    latencies = []
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        call(images[len(latencies) % len(images)])
        latencies.append(time.perf_counter() - now)
    return 1e6 * statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    detector = _detector()
    shape = (1, *detector.input_shape)
    rng = np.random.default_rng(0)
    images = [rng.random(shape, dtype=np.float32) for _ in range(16)]
    model, echo = Remote(False, shape), Remote(True, shape)
    configs: dict[str, Callable[[np.ndarray], Any]] = {
        "in-process (a worker's own session)": detector.run_arrays,
        "pipe to a model process": model.pipe,
        "shared memory to a model process": model.shared,
        "pipe, echo (transport only)": echo.pipe,
        "shared memory, echo (transport only)": echo.shared,
    }
    try:
        for call in configs.values():  # warm-up, and the answers agree
            call(images[0])
        assert int(model.pipe(images[0])["label"][0]) == int(
            detector.run_arrays(images[0])["label"][0]
        )
        rounds: dict[str, list[float]] = {name: [] for name in configs}
        names = list(configs)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rounds[name].append(timed(configs[name], images, args.seconds))
                print(f"  round {r + 1}/{args.rounds} {name:40s} {rounds[name][-1]:8.1f} us")
    finally:
        model.close()
        echo.close()
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    base = medians["in-process (a worker's own session)"]
    # The echo rows are the transport alone: no model, nothing to compare with in-process.
    rows: list[list[Any]] = [
        [name, us, "-" if "echo" in name else us - base] for name, us in medians.items()
    ]
    print(f"{'configuration':42s} {'us/request':>10s} {'vs in-process':>14s}")
    for name, us, extra in rows:
        print(f"{name:42s} {us:10.1f} {extra if isinstance(extra, str) else f'{extra:+.1f}':>14s}")
    if args.json:
        write_result(
            args.json,
            "handoff",
            f"Handing one image to a model process, batch 1, {MODEL.parent.name}/{MODEL.name}, CPU",
            {"medians_us": medians, "rounds_us": rounds, "seconds": args.seconds},
            [
                table(
                    "Median microseconds per request (one client, batch 1)",
                    ["configuration", "us/request", "vs in-process (us)"],
                    rows,
                    ["", ".1f", "+.1f"],
                )
            ],
            [
                "one client at a time, no event loop and no batcher on either side",
                "each hand-off wakes the model process and then the client: on a machine whose "
                "cores are busy with other work, the model rows carry the scheduler's wake-up "
                "latency (up to a tick each way), which the echo rows, answered before the "
                "client sleeps, do not; compare the load average above",
            ],
        )


if __name__ == "__main__":
    main()
