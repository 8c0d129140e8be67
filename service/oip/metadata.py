"""What the Open Inference Protocol says about the server and its models, as plain dicts.

REST returns them as JSON; gRPC copies them into its messages. The model configuration is
Triton's (`max_batch_size`, inputs and outputs with dims that exclude the batch dimension,
`dynamic_batching`), which Triton's clients and `perf_analyzer` read: `max_batch_size` is the
most images one request may carry (`max_images`), and the dynamic-batching delay is the
service's `max_queue_delay`. The decision constants travel as config parameters, as in the
config.pbtxt that `rcegate export-triton` writes.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from models.layout import parse_version as canonical_version
from models.manifest import INPUT_NAME, OUTPUT_NAMES
from service.detector import OUTPUT_DTYPES, Detector
from service.errors import ModelNotFound
from service.oip.codec import INPUT_DATATYPE
from service.repository import ModelRepository
from service.settings import Settings
from service.text import shown

SERVER_NAME = "rcegate"
# `binary_tensor_data`: Triton's extension for REST; `model_configuration`: GET .../config.
EXTENSIONS = ("binary_tensor_data", "model_configuration")
PLATFORM = "onnxruntime_onnx"
_OIP_TYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(bool)": "BOOL"}
PER_CLASS = ("logits", "probabilities")  # [N, L]; every other output is [N]


def server_version() -> str:
    try:
        return version("rcegate")
    except PackageNotFoundError:  # run from a source tree without installing
        return "0"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def parse_version(name: str, text: str | None) -> int | None:
    """An OIP version string -> rcegate's integer version; "" or None means the newest. Only
    the canonical spelling names a version (`2`; `02`, `2.0`, `²` name none: 404)."""
    if not text:
        return None
    version = canonical_version(text)
    if version is None:
        raise ModelNotFound(f"model {shown(name)} has no version {shown(text)}")
    return version


def output_specs(detector: Detector) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every graph output, -1 for the batch dimension."""
    classes = detector.manifest.num_classes
    return [
        (name, _OIP_TYPES[OUTPUT_DTYPES[name]], [-1, classes] if name in PER_CLASS else [-1])
        for name in OUTPUT_NAMES
    ]


def model_metadata(detector: Detector, repository: ModelRepository) -> dict[str, Any]:
    versions = [str(d.version) for d in repository.detectors() if d.name == detector.name]
    return {
        "name": detector.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, *detector.input_shape]}
        ],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": shape}
            for name, datatype, shape in output_specs(detector)
        ],
    }


def model_config(detector: Detector, settings: Settings) -> dict[str, Any]:
    """Triton's model configuration in its JSON form (proto field names, TYPE_* data types)."""
    outputs = []
    for name, datatype, shape in output_specs(detector):
        output: dict[str, Any] = {"name": name, "data_type": f"TYPE_{datatype}"}
        if len(shape) > 1:
            output["dims"] = shape[1:]
        else:  # a per-image scalar: Triton wants dims [1] reshaped to []
            output["dims"] = [1]
            output["reshape"] = {"shape": []}
        outputs.append(output)
    decision = detector.decision()
    return {
        "name": detector.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": settings.max_images,
        "input": [
            {
                "name": INPUT_NAME,
                "data_type": f"TYPE_{INPUT_DATATYPE}",
                "dims": list(detector.input_shape),
            }
        ],
        "output": outputs,
        "dynamic_batching": {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": round(settings.max_queue_delay * 1e6),
        },
        "parameters": {
            "rcegate.metric": {"string_value": decision.metric},
            "rcegate.threshold": {"string_value": repr(decision.threshold)},
            "rcegate.target_fpr": {"string_value": repr(decision.target_fpr)},
            "rcegate.version": {"string_value": str(detector.version)},
        },
    }
