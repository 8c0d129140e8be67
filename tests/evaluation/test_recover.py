"""Committed artifacts ship without checkpoints: their torch networks are rebuilt from the ONNX."""

import pytest
from torch import nn

from tests.conftest import DEFAULT_MODEL_DIR
from training.recover import RecoveryError, load_artifact_network, network_from_onnx


def test_committed_default_model_rebuilds_into_its_torch_network():
    # load_artifact_network raises unless the rebuilt logits match ONNX Runtime's.
    network, manifest, dataset = load_artifact_network(DEFAULT_MODEL_DIR)
    assert manifest.objective == "rce" and network.depth == manifest.architecture.depth
    # The default model (v2) was trained with the official recipe: BatchNorm eps 1e-3.
    assert manifest.training["recipe"] == "official"
    assert all(m.eps == 1e-3 for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    assert not network.training and dataset.name == manifest.dataset.name


def test_official_recipe_artifact_rebuilds_with_its_batch_norm_epsilon(tiny_artifact):
    network, manifest, _ = load_artifact_network(tiny_artifact.path)
    assert manifest.training["recipe"] == "official"
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)


def test_rebuild_refuses_a_network_the_graph_does_not_hold(tiny_artifact):
    from training.nets import ResNet

    # The graph holds a depth-8 network: a depth-14 one has blocks it has no weights for. The
    # function's own check names them (torch's load_state_dict would raise a RuntimeError).
    with pytest.raises(RecoveryError, match=r"model\.onnx: no weights for blocks\.\d"):
        network_from_onnx(tiny_artifact.path / "model.onnx", ResNet(depth=14))
