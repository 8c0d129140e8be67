"""What loading verifies beyond the hash and the input shape: the graph's input and output names
and types, the self-test (the graph's `accepted` vs the manifest threshold, the probabilities'
shape), the served target FPR against the calibration table; and what ONNX Runtime is asked
for: providers (CUDA -> CPU under `auto`) and thread settings, read back from the real session."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from models.manifest import MANIFEST_FILE, MODEL_FILE, sha256_file
from service import detector as detector_module
from service.detector import CPU, CUDA, ModelLoadError, create_session, session_options
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import copy_model, started, wait_loaded
from training.stamp import restamp


def edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_graph(directory: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Change model.onnx and record its new hash, so that only the edit can be refused."""
    model = onnx.load(directory / MODEL_FILE)
    edit(model)
    onnx.save(model, directory / MODEL_FILE)
    digest = sha256_file(directory / MODEL_FILE)
    edit_manifest(directory, lambda data: data.update(sha256=digest))


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.input, *model.graph.output]:
        if value.name == old:
            value.name = new


def rename_input(model: onnx.ModelProto) -> None:
    rename_value(model, "images", "pixels")


def double_input(model: onnx.ModelProto) -> None:
    """`images` becomes float64, cast to float32 inside the graph: still a working graph."""
    rename_value(model, "images", "images_f32")
    model.graph.input[0].name = "images"
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    cast = helper.make_node("Cast", ["images"], ["images_f32"], to=TensorProto.FLOAT)
    model.graph.node.insert(0, cast)


def double_confidence(model: onnx.ModelProto) -> None:
    """The `confidence` output becomes float64 (cast at the end of the graph)."""
    rename_value(model, "confidence", "confidence_f32")
    output = next(o for o in model.graph.output if o.name == "confidence_f32")
    output.name = "confidence"
    output.type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.node.append(
        helper.make_node("Cast", ["confidence_f32"], ["confidence"], to=TensorProto.DOUBLE)
    )


def drop_accepted(model: onnx.ModelProto) -> None:
    rename_value(model, "accepted", "accepted_renamed")


@pytest.fixture
def broken(tmp_path: Path, tiny_artifact: TinyArtifact) -> Path:
    """A copy of the tiny artifact to break, beside a good copy that keeps serving."""
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    return copy_model(tiny_artifact.path, tmp_path, "broken", 1)


def refusal(model_dir: Path, **settings: object) -> dict[str, str]:
    """Start an app over `model_dir`; every refused version's reason, and ready's status."""
    app_settings = Settings(model_dir=model_dir, default_model="tiny", **settings)  # type: ignore[arg-type]
    with started(app_settings) as client:
        wait_loaded(client)
        reasons = {
            f"{r['name']}/{r['version']}": r["reason"]
            for r in client.get("/v1/models").json()["refused"]
        }
        reasons["ready"] = str(client.get("/health/ready").status_code)
        return reasons


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (rename_input, "graph inputs are ['pixels'], expected ['images']"),
        (double_input, "input 'images' has type tensor(double), expected tensor(float)"),
        (drop_accepted, "output 'accepted' is None, expected tensor(bool)"),
        (double_confidence, "output 'confidence' is tensor(double), expected tensor(float)"),
    ],
    ids=["input-name", "input-type", "missing-output", "output-type"],
)
def test_graph_inputs_and_outputs_must_match_the_contract(
    broken: Path, edit: Callable[[onnx.ModelProto], None], reason: str
) -> None:
    edit_graph(broken, edit)
    # The edited graph itself is sound: ONNX Runtime loads it; only our check refuses it.
    ort.InferenceSession(str(broken / MODEL_FILE), providers=[CPU])
    reasons = refusal(broken.parent.parent)
    assert reasons["broken/1"] == reason
    assert reasons["ready"] == "200"  # the good model keeps serving


def test_manifest_must_list_the_contract_outputs(broken: Path) -> None:
    edit_manifest(broken, lambda data: data.update(outputs=data["outputs"][:-1]))
    reasons = refusal(broken.parent.parent)
    assert reasons["broken/1"].startswith("manifest.json is invalid: ")
    assert reasons["broken/1"].endswith("outputs lack ['accepted']")


def negate_accepted(model: onnx.ModelProto) -> None:
    """The graph's `accepted` becomes its opposite (a Not at the end of the graph)."""
    rename_value(model, "accepted", "accepted_by_threshold")
    output = next(o for o in model.graph.output if o.name == "accepted_by_threshold")
    output.name = "accepted"
    model.graph.node.append(helper.make_node("Not", ["accepted_by_threshold"], ["accepted"]))


@pytest.mark.parametrize("negate", [False, True], ids=["as-exported", "negated-accepted"])
def test_self_test_refuses_a_manifest_threshold_the_graph_does_not_apply(
    broken: Path, negate: bool
) -> None:
    # Negating the graph's `accepted` turns the disagreement around: one case has the graph
    # accept what the manifest rejects, the other the graph reject what the manifest accepts.
    if negate:
        edit_graph(broken, negate_accepted)
    # The graph bakes its threshold in. What does it decide for the self-test's all-zero image?
    session = ort.InferenceSession(str(broken / MODEL_FILE), providers=[CPU])
    (accepted,) = session.run(["accepted"], {"images": np.zeros((1, 1, 28, 28), np.float32)})
    # A manifest threshold that decides the opposite (scores are finite, far inside +-1e30).
    claimed = 1e30 if accepted[0] else -1e30
    edit_manifest(broken, lambda data: data["detection"]["thresholds"].update(log_kd=claimed))
    restamp(broken, force=True)  # a graph bound to that manifest: only the self-test can tell
    assert refusal(broken.parent.parent)["broken/1"] == (
        "self-test: the graph's `accepted` disagrees with the manifest threshold"
    )


def _one_more_class(data: dict) -> None:
    """An 11th class name, with a Mahalanobis mean for it: a manifest consistent in itself."""
    data["dataset"]["class_names"].append("extra")
    for layer in data["detection"]["mahalanobis"]["layers"]:
        layer["means"].append(layer["means"][0])


def test_self_test_refuses_a_graph_with_another_number_of_classes(broken: Path) -> None:
    edit_manifest(broken, _one_more_class)
    restamp(broken, force=True)  # a graph bound to that manifest: only the self-test can tell
    assert refusal(broken.parent.parent)["broken/1"] == "self-test: probabilities shape (2, 10)"


def test_default_target_fpr_outside_the_calibration_table_refuses_every_model(
    tmp_path: Path, tiny_artifact: TinyArtifact, caplog: pytest.LogCaptureFixture
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    caplog.set_level(logging.ERROR, logger="service")
    reasons = refusal(tmp_path, target_fpr=0.9)
    assert reasons["tiny/1"] == "served target_fpr: target_fpr must lie in [0.001, 0.5], got 0.9"
    assert reasons["ready"] == "503"  # no model is served at an uncalibrated FPR
    assert any(r.getMessage().startswith("refused model tiny/1 from ") for r in caplog.records)


def test_thread_and_optimisation_settings_reach_the_onnx_runtime_session(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(intra_op_threads=1, inter_op_threads=2, graph_optimization="basic")
    detector = client.app.state.repository.get("tiny")  # type: ignore[attr-defined]
    options = detector.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"


def test_auto_falls_back_to_cpu_when_cuda_is_offered_but_does_not_load(
    tiny_artifact: TinyArtifact,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This onnxruntime is CPU-only: it is made to *offer* CUDA, so the real session is asked
    for [CUDA, CPU] and really comes up on CPU alone, as it does where the CUDA libraries are
    missing. (Loading CUDA itself needs a GPU and onnxruntime-gpu: not exercised here.)"""
    if CUDA in ort.get_available_providers():
        pytest.fail("this test needs the CPU-only onnxruntime the test setup installs")
    preloads: list[bool] = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda: preloads.append(True), raising=False)
    monkeypatch.setattr(detector_module, "_preloaded", False)
    model = (tiny_artifact.path / MODEL_FILE).read_bytes()
    caplog.set_level(logging.WARNING, logger="service")

    offered = "Specified provider 'CUDAExecutionProvider' is not in available provider names"
    with pytest.warns(UserWarning, match=offered):  # ORT's own word: it drops CUDA
        session = create_session(model, "auto", session_options())
    assert session.get_providers() == [CPU]
    assert preloads == [True]  # the CUDA/cuDNN wheels' libraries were preloaded first
    assert "CUDA execution provider is available but did not load; using CPU" in caplog.messages
    outputs = session.run(None, {"images": np.zeros((1, 1, 28, 28), np.float32)})
    assert outputs[1].shape == (1, 10)

    monkeypatch.setattr(detector_module, "_preloaded", False)
    with (
        pytest.warns(UserWarning, match=offered),
        pytest.raises(ModelLoadError, match="^providers=cuda but the CUDA execution provider "),
    ):
        create_session(model, "cuda", session_options())
    assert preloads == [True, True]
    # `cpu` never asks for CUDA (nor preloads its libraries), even when it is offered.
    monkeypatch.setattr(detector_module, "_preloaded", False)
    assert create_session(model, "cpu", session_options()).get_providers() == [CPU]
    assert preloads == [True, True]
