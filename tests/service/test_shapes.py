"""Batch shapes (service.shapes), their settings, and the CUDA provider's options from settings."""

from __future__ import annotations

import logging
from typing import Any

import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service import detector as detector_module
from service.detector import CPU, CUDA, CudaOptions
from service.repository import ModelRepository
from service.settings import Settings
from service.shapes import AUTO, BatchShapes
from tests.conftest import TinyArtifact


@given(
    max_batch=st.integers(1, 256),
    spec=st.sampled_from(["any", "pow2", "max", "list"]),
    data=st.data(),
)
def test_fit_is_the_smallest_allowed_shape_that_holds_the_batch(
    max_batch: int, spec: str, data: st.DataObject
) -> None:
    if spec == "list":
        sizes = data.draw(st.sets(st.integers(1, max_batch), max_size=5)) | {max_batch}
        spec = ",".join(map(str, sorted(sizes, reverse=True)))
    shapes = BatchShapes.parse(spec, max_batch)
    count = data.draw(st.integers(1, max_batch))
    shape = shapes.fit(count)
    allowed = range(1, max_batch + 1) if shapes.sizes is None else shapes.sizes
    assert shape in allowed and shape >= count
    assert not [s for s in allowed if count <= s < shape]
    assert shapes.fit(max_batch) == max_batch
    assert set(shapes.warmup()) <= set(allowed)


@pytest.mark.parametrize(
    ("spec", "sizes", "warmup"),
    [
        ("any", None, (1, 64)),
        ("pow2", (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16, 32, 64)),
        ("max", (64,), (64,)),
        ("64,1,8", (1, 8, 64), (1, 8, 64)),
    ],
)
def test_each_spelling_gives_its_shapes_and_warm_up_set(
    spec: str, sizes: tuple[int, ...] | None, warmup: tuple[int, ...]
) -> None:
    shapes = BatchShapes.parse(spec, 64)
    assert (shapes.sizes, shapes.warmup()) == (sizes, warmup)


def test_pow2_includes_a_max_batch_size_that_is_not_a_power_of_two() -> None:
    assert BatchShapes.parse("pow2", 48).sizes == (1, 2, 4, 8, 16, 32, 48)


def test_auto_is_the_default_of_the_provider_in_use() -> None:
    assert BatchShapes.resolve("auto", 64, CPU) == BatchShapes.parse(AUTO[CPU], 64)
    assert BatchShapes.resolve("auto", 64, CUDA) == BatchShapes.parse(AUTO[CUDA], 64)
    assert BatchShapes.resolve("pow2", 64, CUDA).sizes == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RCEGATE_BATCH_SHAPES": "powers"}, "use auto, any, pow2, max or a list"),
        ({"RCEGATE_BATCH_SHAPES": "1,8,128"}, r"every shape must lie in 1..max_batch_size \(64\)"),
        ({"RCEGATE_BATCH_SHAPES": "0,64"}, r"every shape must lie in 1..max_batch_size"),
        ({"RCEGATE_BATCH_SHAPES": "1,8,32"}, "the largest shape must be max_batch_size"),
        (
            {"RCEGATE_BATCH_SHAPES": "1,64", "RCEGATE_MAX_BATCH_SIZE": "32"},
            r"every shape must lie in 1..max_batch_size \(32\)",
        ),
        ({"RCEGATE_CUDA_CUDNN_CONV_ALGO_SEARCH": "FAST"}, "cuda_cudnn_conv_algo_search"),
        ({"RCEGATE_CUDA_ARENA_EXTEND_STRATEGY": "grow"}, "cuda_arena_extend_strategy"),
        ({"RCEGATE_CUDA_GPU_MEM_LIMIT": "-1"}, "cuda_gpu_mem_limit"),
    ],
)
def test_invalid_shape_and_cuda_settings_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_batch_shapes_setting_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEGATE_BATCH_SHAPES", " 1, 8 ,64 ")
    assert Settings().batch_shapes == "1,8,64"
    monkeypatch.setenv("RCEGATE_BATCH_SHAPES", "POW2")
    assert Settings().batch_shapes == "pow2"


def test_auto_search_is_exhaustive_for_one_shape_and_default_for_several() -> None:
    options = CudaOptions()
    one = options.provider_options(BatchShapes.parse("max", 64))
    assert one == {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "do_copy_in_default_stream": "1",
    }
    several = options.provider_options(BatchShapes.parse("pow2", 64))
    assert several["cudnn_conv_algo_search"] == "DEFAULT"
    assert options.provider_options(BatchShapes.parse("any", 64))["cudnn_conv_algo_search"] == (
        "DEFAULT"
    )
    chosen = CudaOptions(cudnn_conv_algo_search="HEURISTIC", gpu_mem_limit=2 << 30)
    assert chosen.provider_options(BatchShapes.parse("max", 64))["cudnn_conv_algo_search"] == (
        "HEURISTIC"
    )
    assert chosen.provider_options(BatchShapes.parse("max", 64))["gpu_mem_limit"] == "2147483648"


def test_cuda_settings_reach_the_cuda_execution_provider_and_the_startup_log(
    tiny_artifact: TinyArtifact,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This onnxruntime is CPU-only: it is made to offer CUDA, so the service asks the real ORT
    for [(CUDA, options), CPU]; ORT then drops CUDA (no CUDA here) and the session runs on CPU,
    as it does where the CUDA libraries are missing. What the service asked for is recorded."""
    if CUDA in ort.get_available_providers():
        pytest.fail("this test needs the CPU-only onnxruntime the test setup installs")
    asked: list[Any] = []
    real = ort.InferenceSession

    def recording(model: bytes, sess_options: Any = None, providers: Any = None) -> Any:
        asked.append(providers)
        return real(model, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", recording)
    monkeypatch.setattr(detector_module, "_preloaded", True)
    caplog.set_level(logging.INFO, logger="service")
    settings = Settings(
        model_dir=tiny_artifact.model_dir,
        max_batch_size=16,
        batch_shapes="1,4,16",
        cuda_device_id=1,
        cuda_cudnn_conv_algo_search="HEURISTIC",
        cuda_gpu_mem_limit=1 << 30,
        cuda_arena_extend_strategy="kSameAsRequested",
        cuda_do_copy_in_default_stream=False,
    )
    repository = ModelRepository(settings)
    repository.load()
    assert asked == [
        [
            (
                CUDA,
                {
                    "device_id": "1",
                    "cudnn_conv_algo_search": "HEURISTIC",
                    "arena_extend_strategy": "kSameAsRequested",
                    "do_copy_in_default_stream": "0",
                    "gpu_mem_limit": "1073741824",
                },
            ),
            CPU,
        ]
    ]
    detector = repository.get("tiny")
    assert detector.providers == [CPU]
    assert detector.provider_options == {CPU: {}}
    assert detector.shapes.sizes == (1, 4, 16)  # the explicit list wins over auto
    (line,) = [m for m in caplog.messages if m.startswith("loaded model tiny/1 ")]
    assert f" on {CPU}; batch shapes 1,4,16 (1,4,16), warm-up of 1,4,16 in " in line


def test_auto_shapes_follow_the_provider_really_in_use(tiny_artifact: TinyArtifact) -> None:
    """providers=auto without CUDA runs on CPU, so auto picks the CPU default."""
    repository = ModelRepository(
        Settings(model_dir=tiny_artifact.model_dir, max_batch_size=16, batch_shapes="auto")
    )
    repository.load()
    detector = repository.get("tiny")
    assert detector.providers == [CPU]
    assert detector.shapes == BatchShapes.resolve("auto", 16, CPU)
