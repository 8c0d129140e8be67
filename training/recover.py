"""Rebuild the torch network of an exported artifact from its `model.onnx`, for white-box attacks.

The committed artifacts ship without their checkpoints, yet gradient attacks need the torch
network. Every weight is in the graph: torch's ONNX export keeps the parameter names, except
that it folds each block's conv1 -> bn2 (eval mode) into one biased convolution. That fold is
undone exactly by loading the folded kernel into conv1 and turning bn2 into "add the folded
bias" (running_mean = -bias, running_var = 1 - eps, unit scale, zero shift). The result is
checked against ONNX Runtime on real images before it is returned.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from models.manifest import INPUT_NAME, MODEL_FILE, Manifest
from training.config import TrainConfig
from training.data import Dataset, load_dataset, to_tensor
from training.losses import deployed_logits
from training.nets import ResNet, build_model
from training.parity import CHECK_IMAGES

_PREFIX = "network."
# The conv1 input of block i: "/network/blocks/blocks.i/..." when the graph ran the network
# through `forward`, "/blocks.i/..." through `forward_layers` (the Mahalanobis score's graphs).
_FOLDED_INPUT = re.compile(r"(?:^|/)blocks\.(\d+)/LeakyRelu_output_0$")
LOGITS_ATOL = 1e-3


class RecoveryError(Exception):
    """The graph does not hold a network this module can rebuild, or the rebuild disagrees."""


def network_from_onnx(path: Path, network: ResNet) -> ResNet:
    """Load into `network` (built as for training) the weights `path` (a model.onnx) holds."""
    graph = onnx.load(str(path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    expected = network.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in expected.items():
        if _PREFIX + key in weights:
            state[key] = torch.from_numpy(weights[_PREFIX + key].copy())
        elif key.endswith("num_batches_tracked"):
            state[key] = value.clone()
    for node in graph.node:
        match = _FOLDED_INPUT.search(node.input[0]) if node.op_type == "Conv" else None
        if match is None or node.input[1].startswith(_PREFIX) or len(node.input) < 3:
            continue
        block = f"blocks.{match.group(1)}"
        kernel, bias = weights[node.input[1]], weights[node.input[2]]
        bn = network.get_submodule(f"{block}.bn2")
        assert isinstance(bn, torch.nn.BatchNorm2d)
        state[f"{block}.conv1.weight"] = torch.from_numpy(kernel.copy())
        state[f"{block}.bn2.weight"] = torch.ones(bias.shape)
        state[f"{block}.bn2.bias"] = torch.zeros(bias.shape)
        state[f"{block}.bn2.running_mean"] = torch.from_numpy(-bias.copy())
        state[f"{block}.bn2.running_var"] = torch.full(bias.shape, 1.0 - bn.eps)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RecoveryError(f"{path}: no weights for {', '.join(missing[:5])} ...")
    network.load_state_dict(state)
    return network.eval()


def load_artifact_network(artifact: Path) -> tuple[ResNet, Manifest, Dataset]:
    """The network behind `artifact`, verified against ONNX Runtime on its own test images."""
    import onnxruntime as ort

    manifest = Manifest.load(artifact)
    dataset = load_dataset(manifest.dataset.name, None, manifest.dataset.split.seed)
    # The manifest records the training config: the network is built as it was trained.
    config = TrainConfig.from_dict(manifest.training)
    network = network_from_onnx(artifact / MODEL_FILE, build_model(config, dataset))
    images = to_tensor(dataset.test.images[:CHECK_IMAGES])
    session = ort.InferenceSession(str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"])
    theirs = session.run(["logits"], {INPUT_NAME: images.numpy()})[0]
    with torch.no_grad():
        ours = deployed_logits(manifest.objective, network(images)[0]).numpy()
    error = float(np.max(np.abs(ours - theirs)))
    if error > LOGITS_ATOL or not np.array_equal(ours.argmax(1), theirs.argmax(1)):
        raise RecoveryError(f"{artifact}: rebuilt network disagrees with ONNX ({error:.3g})")
    return network, manifest, dataset
