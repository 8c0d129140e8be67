"""Open Inference Protocol tensors and parameters: pure functions, no web or gRPC imports.

Both transports (REST with JSON or Triton's binary tensor data, gRPC with raw contents) end in
the same checks before the data plane sees a tensor: one input named `images`, datatype FP32,
shape [N, C, H, W] with the model's C, H, W, 1 <= N <= max_images, and a byte count that equals
N*C*H*W*4 exactly. Every size is checked from the declared shape (with Python integers, so no
overflow) before any array is built. Refusals are `InvalidInput` (400) with a message that names
the field, or `TooManyImages` (413) as on v1. Non-finite and out-of-range values are refused by
the data plane's `check_tensor`.

Answers: every graph output can be returned; `accepted` is the service's own decision at the
threshold used (not the graph's, which knows only the deployed threshold), and it and the
decision's score are always returned, whatever outputs were asked for. In enforce mode a
rejected image's `label` is -1 and its `probabilities` and `logits` are all zero: the tensor
keeps its shape, holds no NaN, and says "withheld" unambiguously (a real probability row sums
to 1). With `withhold_rejected` (the default) its scores (`confidence`, `non_me`, `log_kd`)
are 0 too and the response parameters leave out `threshold` whenever an image was withheld,
as v1 answers null: a rejected image's answer is its verdict, never a score to climb.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.manifest import INPUT_NAME, METRICS, OUTPUT_NAMES
from service.dataplane import Prediction, PredictOptions
from service.errors import InvalidInput, TooManyImages
from service.oip.bounds import MAX_DIMS
from service.text import shown

INPUT_DATATYPE = "FP32"
# OIP datatype names of the numpy dtypes the graph produces (and of its one input); keyed by
# dtype, not `dtype.name`, which numpy computes in Python on every access.
DATATYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.bool_): "BOOL",
}
# Bytes per element of every OIP datatype, for messages about a datatype we do not take.
_ITEMSIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
}
# Outputs withheld for a rejected image in enforce mode, and what replaces them.
WITHHELD_LABEL = -1
WITHHELD = ("label", "probabilities", "logits")
WITHHELD_SCORE = 0.0  # what a withheld score reads (never look at it: `accepted` is false)
MODES = ("annotate", "enforce")


@dataclass(frozen=True)
class InputHeader:
    """The declared input: checked before its data is looked at."""

    shape: tuple[int, int, int, int]

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def byte_size(self) -> int:
        return math.prod(self.shape) * 4


def check_input_header(
    name: object,
    datatype: object,
    shape: object,
    image_shape: tuple[int, int, int],
    max_images: int,
) -> InputHeader:
    """The one input's name, datatype and shape, against the model and the image limit."""
    if name != INPUT_NAME:
        raise InvalidInput(f"unknown input {shown(name)}: the model has one input, {INPUT_NAME!r}")
    if datatype != INPUT_DATATYPE:
        raise InvalidInput(
            f"input {INPUT_NAME!r} must have datatype {INPUT_DATATYPE}, got {shown(datatype)}"
        )
    dims = ", ".join(map(str, image_shape))
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str | bytes)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise InvalidInput(
            f"input {INPUT_NAME!r}: shape must be a list of integers (at most {MAX_DIMS})"
        )
    if len(shape) != 4 or tuple(shape[1:]) != image_shape or shape[0] < 0:
        got = ", ".join(shown(d, 20) for d in shape)
        raise InvalidInput(f"input {INPUT_NAME!r} must have shape [N, {dims}], got [{got}]")
    count = int(shape[0])
    if count == 0:
        raise InvalidInput(f"input {INPUT_NAME!r} holds no image (N = 0)")
    if count > max_images:
        raise TooManyImages(f"at most {max_images} images per request, got {count}")
    return InputHeader((count, *image_shape))


def tensor_from_bytes(data: bytes | memoryview, header: InputHeader) -> np.ndarray:
    """Little-endian FP32 bytes -> float32 [N, C, H, W], refusing any other byte count."""
    if len(data) != header.byte_size:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: shape {list(header.shape)} of {INPUT_DATATYPE} needs "
            f"{header.byte_size} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype="<f4").reshape(header.shape)


def tensor_from_values(values: object, header: InputHeader) -> np.ndarray:
    """JSON numbers (flat or nested, row-major) -> float32 [N, C, H, W]."""
    if not isinstance(values, list):
        raise InvalidInput(f"input {INPUT_NAME!r}: data must be a list of numbers")
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError, TypeError):  # ragged nesting, integers beyond int64
        raise InvalidInput(f"input {INPUT_NAME!r}: data is not a rectangular array") from None
    if array.dtype.kind not in "iuf":  # strings, booleans, nulls, objects
        raise InvalidInput(f"input {INPUT_NAME!r}: data must hold numbers only")
    expected = math.prod(header.shape)
    if array.size != expected:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: shape {list(header.shape)} needs {expected} values, "
            f"got {array.size}"
        )
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused as non-finite
        return array.astype(np.float32).reshape(header.shape)


def tensor_from_fp32(values: Sequence[float], header: InputHeader) -> np.ndarray:
    """gRPC `contents.fp32_contents` -> float32 [N, C, H, W]."""
    expected = math.prod(header.shape)
    if len(values) != expected:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: shape {list(header.shape)} needs {expected} values in "
            f"fp32_contents, got {len(values)}"
        )
    return np.asarray(values, dtype=np.float32).reshape(header.shape)


def byte_size_of(datatype: str, shape: Sequence[int]) -> int | None:
    """Bytes of a tensor of `datatype` and `shape`, None when unknown (BYTES, bad names)."""
    size = _ITEMSIZE.get(datatype)
    return None if size is None else size * math.prod(shape)


def parse_options(parameters: Mapping[str, object]) -> PredictOptions:
    """The request parameters rcegate reads: `target_fpr` (a number in (0, 1)) and `mode`
    (annotate|enforce), as the v1 query. Other parameters are ignored, as the protocol allows."""
    target_fpr = parameters.get("target_fpr")
    mode = parameters.get("mode")
    if target_fpr is not None:
        if isinstance(target_fpr, bool) or not isinstance(target_fpr, int | float):
            raise InvalidInput(f"parameter target_fpr must be a number, got {shown(target_fpr)}")
        if not (math.isfinite(target_fpr) and 0 < target_fpr < 1):
            raise InvalidInput(f"parameter target_fpr must lie in (0, 1), got {shown(target_fpr)}")
        target_fpr = float(target_fpr)
    if mode is not None and mode not in MODES:
        raise InvalidInput(f"parameter mode must be 'annotate' or 'enforce', got {shown(mode)}")
    return PredictOptions(target_fpr=target_fpr, mode=mode)  # type: ignore[arg-type]


def select_outputs(requested: Sequence[str] | None, metric: str) -> list[str]:
    """The outputs to return, in order: those asked for (every output when none are), then the
    verdict (`accepted` and the decision's score) when the client left it out."""
    if requested is None:
        return list(OUTPUT_NAMES)
    seen: set[str] = set()
    for name in requested:
        if name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"unknown output {shown(name)}; the model's outputs are {', '.join(OUTPUT_NAMES)}"
            )
        if name in seen:
            raise InvalidInput(f"output {shown(name)} is requested twice")
        seen.add(name)
    verdict = [name for name in ("accepted", metric) if name not in seen]
    return [*requested, *verdict]


def result_tensors(prediction: Prediction, withhold_rejected: bool = True) -> dict[str, np.ndarray]:
    """Every output for the answer: the service's `accepted`, and enforce mode applied (the
    scores too with `withhold_rejected`)."""
    arrays = dict(prediction.outputs.arrays)
    arrays["accepted"] = np.asarray(prediction.accepted, dtype=bool)
    hidden = ~np.array([prediction.shown(i) for i in range(len(prediction))], dtype=bool)
    if hidden.any():
        label = arrays["label"].copy()
        label[hidden] = WITHHELD_LABEL
        arrays["label"] = label
        for name in ("probabilities", "logits", *(METRICS if withhold_rejected else ())):
            values = arrays[name].copy()
            values[hidden] = WITHHELD_SCORE
            arrays[name] = values
    return arrays


def response_parameters(prediction: Prediction, withhold_rejected: bool = True) -> dict[str, Any]:
    """The decision every image was judged by: accept iff `<metric>` >= `threshold`; without
    the threshold when an image's scores were withheld (enforce mode)."""
    p = prediction
    withheld = 0 if p.mode == "annotate" else int((~p.accepted).sum())
    parameters: dict[str, Any] = {"metric": p.decision.metric}
    if not (withheld and withhold_rejected):
        parameters["threshold"] = float(p.decision.threshold)
    parameters.update(
        target_fpr=float(p.decision.target_fpr),
        mode=p.mode,
        accepted_count=int(p.accepted.sum()),
        withheld_count=withheld,
    )
    return parameters


def datatype_of(array: np.ndarray) -> str:
    return DATATYPES[array.dtype]


def little_endian_bytes(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes (BOOL as one byte 0/1), as the binary extension wants."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
