"""ONNX Runtime against torch: the one check that an exported graph computes what its detector does.

Export runs it before anything is written (as timm's export does) and evaluation runs it before
attacking, so the attacks hit exactly what is deployed. Every output of the graph is compared:
the float outputs within an absolute tolerance each (plus `RTOL` of the torch value), `label`
exactly, and `accepted` exactly except where the default score sits within its tolerance of the
threshold, where a float rounding may legitimately flip the decision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.manifest import INPUT_NAME, METRICS
from training.deployed import DeployedModel, detector_outputs
from training.scores import SCORES

# Absolute tolerance of each float output (each score's is in its registry entry); RTOL of the
# torch value on top.
ATOL: dict[str, float] = {
    "logits": 1e-3,
    "probabilities": 1e-4,
    **{metric: SCORES[metric].atol for metric in METRICS},
}
RTOL = 1e-4
# Real test images compared (by export, evaluation and the network rebuilt from a graph).
CHECK_IMAGES = 64
EXACT = ("label", "accepted")


class ParityError(Exception):
    """ONNX Runtime and the torch detector disagree; the message says on what."""


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every output of the graph at `path` (ONNX Runtime, CPU) for float images in [0, 1]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        for name, value in zip(names, session.run(names, {INPUT_NAME: batch}), strict=True):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare(
    ort_out: dict[str, np.ndarray],
    torch_out: dict[str, np.ndarray],
    default_metric: str,
    threshold: float,
) -> dict[str, float]:
    """Raise ParityError on any disagreement; return the max abs error of each float output."""
    if list(ort_out) != list(torch_out):
        raise ParityError(f"the graph outputs {list(ort_out)}, the detector {list(torch_out)}")
    unchecked = set(ort_out) - set(ATOL) - set(EXACT)
    if unchecked:
        raise ParityError(f"no tolerance for graph outputs {sorted(unchecked)}")
    for name in ort_out:
        if ort_out[name].shape != torch_out[name].shape:
            raise ParityError(
                f"ONNX Runtime and torch disagree on the shape of {name}: "
                f"{ort_out[name].shape} vs {torch_out[name].shape}"
            )
    if not np.array_equal(ort_out["label"], torch_out["label"]):
        raise ParityError("ONNX Runtime and torch disagree on predicted labels")
    errors: dict[str, float] = {}
    for name, atol in ATOL.items():
        if name not in ort_out:
            continue
        errors[name] = float(np.max(np.abs(ort_out[name] - torch_out[name]), initial=0.0))
        if not np.allclose(ort_out[name], torch_out[name], atol=atol, rtol=RTOL):
            raise ParityError(f"ONNX Runtime and torch disagree on {name}: {errors[name]:.3g}")
    # `accepted` may only differ where the default score sits on the threshold.
    score = torch_out[default_metric]
    borderline = np.abs(score - threshold) <= ATOL[default_metric] + RTOL * abs(threshold)
    flipped = ort_out["accepted"] != torch_out["accepted"]
    if (flipped & ~borderline).any():
        raise ParityError(
            f"ONNX Runtime and torch disagree on accepted for {int((flipped & ~borderline).sum())} "
            f"image(s) whose {default_metric} is not near the threshold {threshold:.6g}"
        )
    return errors


@torch.no_grad()
def check_parity(path: Path, detector: DeployedModel, images: np.ndarray) -> dict[str, float]:
    """Compare the graph at `path` with `detector` on float images in [0, 1]: raise ParityError
    on any disagreement, else return the max abs error of each float output."""
    return compare(
        onnx_outputs(path, images),
        detector_outputs(detector, images),
        detector.default_metric,
        float(detector.threshold),
    )
