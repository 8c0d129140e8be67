"""Benchmark: what one image costs `service.imaging.decode_image`, CPU time and peak memory.

The attack images of issue 9 (a 69-byte PNG declaring 1 x 16,777,216 pixels, a 94 KB float TIFF
declaring 4096 x 4096) and the largest images the default limits accept (2048 x 2048 grey, RGB,
16-bit grey; PNG, JPEG, TIFF), plus 4096 x 4096 ones, which the defaults refuse. Each image is
decoded to the MNIST input (1, 28, 28) in a fresh process, after a warm-up decode, so the peak
RSS growth (the high-water mark VmHWM minus the RSS just before) is that image's alone. Limits
are the defaults of `service.settings.Settings`.

    python bench/decode_cost.py [--shape 1 28 28]
"""

from __future__ import annotations

import argparse
import io
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import io, sys, time
import numpy as np
from PIL import Image
from service import imaging
from service.settings import Settings
settings = Settings()
limits = imaging.DecodeLimits(
    settings.max_image_side, settings.max_pixels, settings.max_request_pixels
)
imaging.configure_pillow(settings.max_pixels)
shape = tuple(int(n) for n in sys.argv[2:5])
for fmt in ("PNG", "JPEG", "TIFF"):  # warm-up: plugins, allocator
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format=fmt)
    imaging.decode_image(buffer.getvalue(), shape, limits)
data = open(sys.argv[1], "rb").read()
base = int(open("/proc/self/statm").read().split()[1]) * 4096
start = time.process_time()
try:
    imaging.decode_image(data, shape, limits)
    result = "decoded"
except imaging.ServiceError as exc:
    result = f"{exc.status} {exc.code}"
cpu = time.process_time() - start
# VmHWM, not ru_maxrss: Linux carries the parent's peak across fork and exec into ru_maxrss.
status = open("/proc/self/status").read().split("VmHWM:")[1]
peak = int(status.split()[0]) * 1024
print(f"{cpu * 1000:.0f} {max(0, peak - base) / 2**20:.0f} {result}")
"""


def png_declaring(width: int, height: int) -> bytes:
    """An 8x8 grey PNG whose IHDR claims width x height (the attack's 69 bytes)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def photo(side: int, channels: int) -> np.ndarray:
    """A diagonal gradient with noise: compresses like a photograph, not like a flat image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    grey = (x + y) * 255 // (2 * side) + rng.integers(-20, 20, (side, side))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.stack([grey, 255 - grey, grey // 2], axis=-1) if channels == 3 else grey


def images() -> dict[str, bytes]:
    def save(array: np.ndarray, fmt: str, **kwargs: object) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    found = {
        "png 1x16777216 (header only)": png_declaring(1, 16_777_216),
        "tiff float 4096x4096": save(
            np.zeros((4096, 4096), np.float32), "TIFF", compression="tiff_adobe_deflate"
        ),
    }
    for side in (2048, 4096):
        found[f"png grey {side}"] = save(photo(side, 1), "PNG")
        found[f"png rgb {side}"] = save(photo(side, 3), "PNG")
        found[f"jpeg rgb {side}"] = save(photo(side, 3), "JPEG", quality=90)
        found[f"tiff rgb {side}"] = save(photo(side, 3), "TIFF")
        found[f"png 16-bit grey {side}"] = save(photo(side, 1).astype(np.uint16) * 257, "PNG")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(1, 28, 28))
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    print(f"{'image':30s} {'bytes':>10s} {'CPU ms':>7s} {'peak MiB':>8s}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in images().items():
            path = Path(tmp) / "image"
            path.write_bytes(data)
            command = [sys.executable, "-c", CHILD, str(path), *map(str, args.shape)]
            out = subprocess.run(command, capture_output=True, text=True, cwd=root, check=True)
            cpu, peak, result = out.stdout.split(maxsplit=2)
            print(f"{name:30s} {len(data):10d} {cpu:>7s} {peak:>8s}  {result.strip()}")


if __name__ == "__main__":
    main()
