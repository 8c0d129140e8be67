"""Batch shapes: which input batch sizes an ONNX Runtime session may ever see.

On CUDA, cuDNN picks its convolution algorithms per input shape, and with the CUDA provider's
default `cudnn_conv_algo_search=EXHAUSTIVE` a change of batch shape cost 255-680 ms on an H200
(a shape seen before paid it again after another shape ran; `DEFAULT` about 24 ms). A dynamic
batcher that feeds whatever size it gathered makes a new shape almost every run, so the service
collapsed under load (issue 20). The batcher therefore runs only a configured set of shapes,
padding a batch up to the next one (the padded rows' outputs are dropped before anything reads
them), and every shape runs once (warm-up) before a version is ready.

The setting (`batch_shapes`):
- `any`: no padding; every batch runs at its own size (1..max_batch_size);
- `pow2`: 1, 2, 4, ... up to max_batch_size (max_batch_size itself included);
- `max`: one shape, max_batch_size;
- an explicit list such as `1,8,64` (each in 1..max_batch_size, the largest = max_batch_size);
- `auto`: the default of the execution provider really in use (`AUTO`).
No web imports, no ONNX Runtime.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# The shape set `auto` picks per execution provider.
# CPU: measured with bench/serving.py (docs/serving.md, bench/results/serving-shapes.json).
# CUDA: PROVISIONAL, from issue 20's H200 figures (a shape change costs 255-680 ms with
# EXHAUSTIVE search; batch 64 costs about what batch 1 costs, 1.36 vs 1.26 ms): one shape.
# bench/gpu_check.sh measures every option on the card; change this line to what it shows.
AUTO: dict[str, str] = {CPU: "any", CUDA: "max"}


@dataclass(frozen=True)
class BatchShapes:
    """The batch sizes a session runs: `sizes` ascending, or None for any size."""

    max_batch_size: int
    sizes: tuple[int, ...] | None = None
    spec: str = "any"

    @classmethod
    def parse(cls, spec: str, max_batch_size: int) -> BatchShapes:
        """`any`, `pow2`, `max` or a comma-separated list; ValueError says what is wrong."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        text = spec.strip().lower()
        if text == "any":
            return cls(max_batch_size, None, "any")
        if text == "max":
            return cls(max_batch_size, (max_batch_size,), "max")
        if text == "pow2":
            sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
            return cls(max_batch_size, tuple(sorted(sizes | {max_batch_size})), "pow2")
        try:
            sizes = {int(part) for part in text.split(",")}
        except ValueError:
            raise ValueError(
                f"batch_shapes {spec!r}: use auto, any, pow2, max or a list like 1,8,64"
            ) from None
        if min(sizes) < 1 or max(sizes) > max_batch_size:
            raise ValueError(
                f"batch_shapes {spec!r}: every shape must lie in 1..max_batch_size "
                f"({max_batch_size})"
            )
        if max(sizes) != max_batch_size:
            raise ValueError(
                f"batch_shapes {spec!r}: the largest shape must be max_batch_size "
                f"({max_batch_size}), or batches of that size could not run"
            )
        ordered = tuple(sorted(sizes))
        return cls(max_batch_size, ordered, ",".join(map(str, ordered)))

    @classmethod
    def resolve(cls, spec: str, max_batch_size: int, provider: str) -> BatchShapes:
        """`spec`, with `auto` replaced by the default of `provider` (the one in use)."""
        if spec.strip().lower() == "auto":
            spec = AUTO.get(provider, "any")
        return cls.parse(spec, max_batch_size)

    def fit(self, count: int) -> int:
        """The shape a batch of `count` images runs at (the smallest shape >= count)."""
        if not 1 <= count <= self.max_batch_size:
            raise ValueError(f"a batch of {count} images is outside 1..{self.max_batch_size}")
        if self.sizes is None:
            return count
        return self.sizes[bisect.bisect_left(self.sizes, count)]

    def warmup(self) -> tuple[int, ...]:
        """The shapes to run once before a version is ready: every shape of the set; for `any`,
        the two that traffic hits most (a lone image, and a full batch under load)."""
        if self.sizes is None:
            return tuple(sorted({1, self.max_batch_size}))
        return self.sizes

    def __str__(self) -> str:
        if self.sizes is None:
            return f"any (1..{self.max_batch_size})"
        return f"{self.spec} ({','.join(map(str, self.sizes))})"
