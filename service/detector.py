"""The domain core: one exported model version behind an ONNX Runtime session. numpy in, numpy out.

A `Detector` runs the artifact's graph (which computes the prediction and the three scores of
Pang et al., NeurIPS 2018) and applies the thresholding test: an image is accepted iff the
chosen metric's score >= the threshold calibrated for the requested target FPR. The graph's own
`accepted` output uses the deployed threshold only; the detector recomputes the decision so any
calibrated target FPR can be served, and the self-test checks both agree at the deployed one.

Loading refuses a model unless its files are trusted (`service.trust`: regular files inside the
repository, bounded sizes, a valid signature when keys are configured), the sha256 of model.onnx
matches the manifest, the graph's inputs and outputs match the manifest, the graph's bound
decision constants equal the manifest's, and a self-test inference succeeds. No web imports.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.layout import identity_mismatch
from models.manifest import (
    INPUT_NAME,
    MANIFEST_FILE,
    METRICS,
    MODEL_FILE,
    OUTPUT_NAMES,
    Manifest,
    Metric,
)
from service.errors import InvalidParameter
from service.settings import Providers
from service.trust import (
    ArtifactPolicy,
    ModelLoadError,
    check_binding,
    check_signature,
    inside,
    parse_manifest,
    read_regular,
)

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# The graph's outputs and the numpy dtypes the service relies on.
OUTPUT_DTYPES: dict[str, str] = {
    "logits": "tensor(float)",
    "probabilities": "tensor(float)",
    "label": "tensor(int64)",
    "confidence": "tensor(float)",
    "non_me": "tensor(float)",
    "log_kd": "tensor(float)",
    "accepted": "tensor(bool)",
}


__all__ = ["Decision", "Detector", "ModelLoadError", "Outputs", "load_detector"]


@dataclass(frozen=True)
class Outputs:
    """The graph's outputs for N images (one ORT run, or one request's rows of a batch)."""

    arrays: dict[str, np.ndarray]  # every graph output by name, N rows each

    @property
    def logits(self) -> np.ndarray:
        return self.arrays["logits"]  # float32 [N, L]: the deployed logits (-Z for RCE)

    @property
    def probabilities(self) -> np.ndarray:
        return self.arrays["probabilities"]  # float32 [N, L]

    @property
    def label(self) -> np.ndarray:
        return self.arrays["label"]  # int64 [N]

    @property
    def scores(self) -> dict[Metric, np.ndarray]:
        """float32 [N] per metric; higher = more like clean data."""
        return {m: self.arrays[m] for m in METRICS}

    @property
    def graph_accepted(self) -> np.ndarray:
        return self.arrays["accepted"]  # bool [N]: default metric vs the deployed threshold


@dataclass(frozen=True)
class Decision:
    """The thresholding test to apply: accept iff scores[metric] >= threshold."""

    metric: Metric
    threshold: float
    target_fpr: float


class Detector:
    """A loaded, verified model version. Thread-safe: ORT sessions allow concurrent runs."""

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        directory: Path,
        default_target_fpr: float | None = None,
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.directory = directory
        self.default_target_fpr = (
            manifest.detection.target_fpr if default_target_fpr is None else default_target_fpr
        )
        self.providers: list[str] = list(session.get_providers())

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def metric(self) -> Metric:
        return self.manifest.detection.default_metric

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.shape

    def decision(self, target_fpr: float | None = None) -> Decision:
        """The default metric's threshold at `target_fpr` (default: the served target FPR).

        Raises InvalidParameter when `target_fpr` lies outside the calibration table.
        """
        fpr = self.default_target_fpr if target_fpr is None else target_fpr
        try:
            threshold = self.manifest.threshold(self.metric, fpr)
        except ValueError as exc:
            raise InvalidParameter(f"target_fpr: {exc}") from None
        return Decision(self.metric, threshold, fpr)

    def thresholds(self) -> dict[Metric, float]:
        """Every metric's threshold at the served target FPR (for the threshold gauge)."""
        return {m: self.manifest.threshold(m, self.default_target_fpr) for m in METRICS}

    def run_arrays(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on float32 [N, C, H, W] images in [0, 1]: every output by name."""
        raw = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, raw, strict=True))

    def run(self, images: np.ndarray) -> Outputs:
        return Outputs(self.run_arrays(images))

    @staticmethod
    def accept(outputs: Outputs, decision: Decision) -> np.ndarray:
        """The thresholding test: bool [N], score >= threshold."""
        return np.asarray(outputs.scores[decision.metric] >= decision.threshold)


_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 0, graph_optimization: str = "all"
) -> ort.SessionOptions:
    """ORT session options from the service settings (also used by the benchmarks)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION[graph_optimization]
    options.log_severity_level = 3  # ORT's own errors still show; its info chatter does not
    # Idle ORT threads otherwise spin, taking CPU from the event loop and the decode threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


_preloaded = False


def preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries that `onnxruntime-gpu[cuda,cudnn]` installed from PyPI
    (onnxruntime >= 1.21 has `preload_dlls`); without it ORT looks only on the system path."""
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)
    if _preloaded or preload is None:
        return
    _preloaded = True
    try:
        preload()
    except Exception as exc:  # missing libraries: ORT then falls back to CPU, checked below
        logger.warning("onnxruntime.preload_dlls() failed: %s", exc)


def create_session(
    model: bytes, providers: Providers, options: ort.SessionOptions
) -> ort.InferenceSession:
    """An ORT session on the requested providers. `auto` takes CUDA only when it really loads:
    ORT silently falls back to CPU when the CUDA libraries are missing, so check what it uses."""
    available = ort.get_available_providers()
    if providers != "cpu" and CUDA in available:
        preload_cuda()
    if providers == "cuda" and CUDA not in available:
        raise ModelLoadError(f"providers=cuda but this onnxruntime offers only {available}")
    wanted = [CUDA, CPU] if providers != "cpu" and CUDA in available else [CPU]
    session = ort.InferenceSession(model, sess_options=options, providers=wanted)
    if CUDA in wanted and CUDA not in session.get_providers():
        if providers == "cuda":
            raise ModelLoadError("providers=cuda but the CUDA execution provider failed to load")
        logger.warning("CUDA execution provider is available but did not load; using CPU")
    return session


def _check_io(session: ort.InferenceSession, manifest: Manifest) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = [i.name for i in inputs]
        raise ModelLoadError(f"graph inputs are {names}, expected [{INPUT_NAME!r}]")
    spec = inputs[0]
    if spec.type != "tensor(float)":
        raise ModelLoadError(f"input {INPUT_NAME!r} has type {spec.type}, expected tensor(float)")
    expected = manifest.input.shape
    shape = list(spec.shape)
    if len(shape) != 4 or tuple(shape[1:]) != expected or isinstance(shape[0], int):
        dims = ", ".join(map(str, expected))
        raise ModelLoadError(
            f"input {INPUT_NAME!r} has shape {shape}, manifest says [batch, {dims}]"
        )
    outputs = {o.name: o.type for o in session.get_outputs()}
    if set(manifest.outputs) != set(OUTPUT_NAMES):
        raise ModelLoadError(f"manifest lists outputs {manifest.outputs}, expected {OUTPUT_NAMES}")
    for name, dtype in OUTPUT_DTYPES.items():
        if outputs.get(name) != dtype:
            raise ModelLoadError(f"output {name!r} is {outputs.get(name)}, expected {dtype}")


def self_test(detector: Detector) -> None:
    """Run a batch of 2 synthetic images and check shapes, ranges and the accept decision."""
    channels, height, width = detector.input_shape
    images = np.stack(
        [
            np.zeros((channels, height, width), np.float32),
            np.linspace(0, 1, channels * height * width, dtype=np.float32).reshape(
                channels, height, width
            ),
        ]
    )
    try:
        out = detector.run(images)
    except Exception as exc:  # ORT raises its own exception types
        raise ModelLoadError(f"self-test inference failed: {exc}") from exc
    classes = detector.manifest.num_classes
    if out.probabilities.shape != (2, classes):
        raise ModelLoadError(f"self-test: probabilities shape {out.probabilities.shape}")
    if not np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ModelLoadError("self-test: probabilities do not sum to 1")
    if out.label.shape != (2,) or not ((out.label >= 0) & (out.label < classes)).all():
        raise ModelLoadError(f"self-test: labels {out.label} outside [0, {classes})")
    for metric, values in out.scores.items():
        if values.shape != (2,) or np.isnan(values).any():
            raise ModelLoadError(f"self-test: {metric} scores {values} are not [2] numbers")
    deployed = detector.manifest.detection.thresholds[detector.metric]
    score = out.scores[detector.metric]
    # Both decide score >= threshold; they may only differ at float rounding of the threshold.
    disagree = (score >= deployed) != out.graph_accepted
    if (disagree & ~np.isclose(score, deployed, rtol=1e-5, atol=1e-6)).any():
        raise ModelLoadError(
            "self-test: the graph's `accepted` disagrees with the manifest threshold"
        )


def load_detector(
    directory: Path,
    providers: Providers = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    target_fpr: float | None = None,
    graph_optimization: str = "all",
    policy: ArtifactPolicy | None = None,
) -> Detector:
    """Load and verify `<name>/<version>/`; raise ModelLoadError with the reason if refused."""
    policy = policy or ArtifactPolicy()
    root = policy.root or directory.parent.parent
    inside(directory, root, f"{directory.parent.name}/{directory.name}")
    try:
        raw = read_regular(directory / MANIFEST_FILE, root, policy.max_manifest_bytes)
    except FileNotFoundError:
        raise ModelLoadError("manifest.json is missing") from None
    if policy.trusted_keys:
        # The signature covers these exact bytes, before the JSON parser sees them.
        signer = check_signature(directory, root, raw, policy)
        logger.debug("%s: manifest signed by key %s", directory, signer)
    manifest = parse_manifest(raw)
    mismatch = identity_mismatch(manifest, directory)
    if mismatch is not None:
        raise ModelLoadError(mismatch)
    try:
        # Hash and load the same bytes, so the file cannot change between check and use.
        model = read_regular(directory / MODEL_FILE, root, policy.max_model_bytes)
    except OSError as exc:  # its text names the file's absolute path: say only what failed
        raise ModelLoadError(f"cannot read {MODEL_FILE}: {exc.strerror or 'error'}") from None
    digest = hashlib.sha256(model).hexdigest()
    if digest != manifest.sha256:
        raise ModelLoadError(
            f"sha256 mismatch: {MODEL_FILE} is {digest}, manifest says {manifest.sha256}"
        )
    try:
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization)
        session = create_session(model, providers, options)
    except ModelLoadError:
        raise
    except Exception as exc:  # ORT raises its own exception types for a corrupt graph
        raise ModelLoadError(f"ONNX Runtime cannot load {MODEL_FILE}: {exc}") from exc
    _check_io(session, manifest)
    check_binding(session.get_modelmeta().custom_metadata_map, manifest)
    detector = Detector(manifest, session, directory, target_fpr)
    try:
        detector.decision()
    except InvalidParameter as exc:
        raise ModelLoadError(f"served {exc.message}") from None
    self_test(detector)
    return detector
