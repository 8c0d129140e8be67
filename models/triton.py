"""Export a model version as a Triton Inference Server (or KServe) model-repository entry.

The ONNX graph already computes the class, the detection scores and the accept/reject decision
(`accepted`, score >= the calibrated threshold), so Triton's onnxruntime backend serves the
same answers as rcegate without any Python around it. The layout written is the one Triton
and KServe's Triton runtime load:

    <repository>/<name>/config.pbtxt
    <repository>/<name>/labels.txt              class names, for Triton's classification extension
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/manifest.json provenance: thresholds, target_fpr, sha256

Shapes and types come from the graph itself (through ONNX Runtime, so neither torch nor the
`onnx` package is needed). The version is found and verified by the repository's own walker
(`models.layout`: highest version, files present, name/version and sha256 against the manifest)
before anything is written, and written with `models.files` (a version appears whole or not at
all). An offline tool over the repository, it lives here, not in the server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from models.files import staged_directory, write_text
from models.layout import DEFAULT_MODEL_DIR, ArtifactError, verified_manifest, version_directory
from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
LABELLED_OUTPUT = "probabilities"

# ONNX Runtime's type strings -> Triton's model-config data types.
_TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8",
    "tensor(bool)": "TYPE_BOOL",
}


class TritonExportError(Exception):
    """The artifact cannot be exported (missing, corrupt, or a graph Triton cannot batch)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: dims exclude the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_tensors(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of the ONNX graph, with a dynamic leading batch dimension required."""
    import onnxruntime as ort  # heavy: imported only when exporting

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return (
        [_tensor_spec(node) for node in session.get_inputs()],
        [_tensor_spec(node) for node in session.get_outputs()],
    )


def _tensor_spec(node: Any) -> TensorSpec:
    """An ONNX Runtime NodeArg (name, type string, shape with str/None for symbolic dims)."""
    name: str = node.name
    onnx_type: str = node.type
    shape: list[int | str | None] = list(node.shape)
    if onnx_type not in _TRITON_TYPES:
        raise TritonExportError(f"{name}: ONNX type {onnx_type} has no Triton equivalent")
    if not shape or isinstance(shape[0], int):
        raise TritonExportError(f"{name}: the first dimension must be a dynamic batch dimension")
    dims = tuple(d if isinstance(d, int) else -1 for d in shape[1:])
    return TensorSpec(name, _TRITON_TYPES[onnx_type], dims)


def _tensor_block(spec: TensorSpec, labels: bool = False) -> str:
    lines = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}"]
    if spec.dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]")
    else:
        # A per-image scalar ([batch] in the graph): Triton wants dims [1] reshaped to [].
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if labels:
        lines.append(f'    label_filename: "{LABELS_FILE}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def _parameter(key: str, value: str) -> str:
    quoted_key, quoted_value = json.dumps(key), json.dumps(value)
    return f"parameters {{\n  key: {quoted_key}\n  value: {{ string_value: {quoted_value} }}\n}}"


def triton_config(
    manifest: Manifest,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
) -> str:
    """The config.pbtxt text for one model (all its versions share it)."""
    detection = manifest.detection
    metric = detection.default_metric
    tensors_in = ",\n".join(_tensor_block(s) for s in inputs)
    tensors_out = ",\n".join(_tensor_block(s, labels=s.name == LABELLED_OUTPUT) for s in outputs)
    parameters = [
        _parameter("rcegate.metric", metric),
        _parameter("rcegate.threshold", repr(detection.thresholds[metric])),
        _parameter("rcegate.target_fpr", repr(detection.target_fpr)),
        _parameter("rcegate.version", str(manifest.version)),
    ]
    return "\n".join(
        [
            f"# rcegate model {manifest.name} v{manifest.version} ({manifest.dataset.name}).",
            f"# `accepted` = {metric} >= {detection.thresholds[metric]!r}, calibrated for "
            f"target_fpr {detection.target_fpr!r}.",
            f'name: "{manifest.name}"',
            'backend: "onnxruntime"',
            f"max_batch_size: {max_batch_size}",
            f"input [\n{tensors_in}\n]",
            f"output [\n{tensors_out}\n]",
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
            "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]",
            *parameters,
            "",
        ]
    )


def export_triton(
    model_dir: Path,
    name: str,
    output: Path,
    version: int | None = None,
    max_batch_size: int = 64,
    overwrite: bool = False,
) -> Path:
    """Write `output/<name>/` for one version of `model_dir/<name>/`; returns the model path.

    The version directory is assembled in a temporary directory and renamed into place, so a
    failed export never leaves half a version behind.
    """
    if max_batch_size < 1:
        raise TritonExportError("max_batch_size must be at least 1")
    try:
        source = version_directory(model_dir, name, version)
        manifest = verified_manifest(source)
    except ArtifactError as error:
        raise TritonExportError(str(error)) from None
    inputs, outputs = graph_tensors(source / MODEL_FILE)

    target = output / name
    destination = target / source.name
    if destination.exists() and not overwrite:
        raise TritonExportError(f"{destination} exists (pass --overwrite to replace it)")
    with staged_directory(destination) as staging:
        shutil.copy2(source / MODEL_FILE, staging / MODEL_FILE)
        shutil.copy2(source / MANIFEST_FILE, staging / MANIFEST_FILE)
    write_text(target / LABELS_FILE, "\n".join(manifest.class_names) + "\n")
    write_text(target / CONFIG_FILE, triton_config(manifest, inputs, outputs, max_batch_size))
    logger.info("exported %s v%d to %s", name, manifest.version, target)
    return target


def register(app: typer.Typer) -> None:
    """Add `rcegate export-triton` to the command (entry point `rcegate.commands:triton`)."""

    @app.command("export-triton")
    def export_triton_command(
        output: Annotated[Path, typer.Argument(help="Triton model repository to write into.")],
        name: Annotated[str, typer.Option(help="Model name under the model directory.")] = (
            "mnist-rce"
        ),
        version: Annotated[
            int | None, typer.Option(help="Model version (default: the highest).")
        ] = None,
        model_dir: Annotated[
            Path | None,
            typer.Option(
                help="rcegate model repository (default: RCEGATE_MODEL_DIR, else the one that "
                "ships with the project).",
            ),
        ] = None,
        max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size.")] = 64,
        overwrite: Annotated[bool, typer.Option(help="Replace an exported version.")] = False,
    ) -> None:
        """Export a model as a Triton Inference Server / KServe model-repository entry."""
        # The service's setting, read here without importing the service.
        source = model_dir or Path(os.environ.get("RCEGATE_MODEL_DIR", DEFAULT_MODEL_DIR))
        try:
            path = export_triton(source, name, output, version, max_batch_size, overwrite)
        except TritonExportError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=1) from error
        typer.echo(str(path))
