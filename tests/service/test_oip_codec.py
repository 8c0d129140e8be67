"""The OIP codec's pure functions: header checks, byte counts, JSON values, outputs, enforce."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.manifest import OUTPUT_NAMES
from service.errors import InvalidInput, TooManyImages
from service.oip.codec import (
    InputHeader,
    check_input_header,
    little_endian_bytes,
    parse_options,
    select_outputs,
    tensor_from_bytes,
    tensor_from_values,
)

SHAPE = (1, 28, 28)


def header(count: int = 2) -> InputHeader:
    return check_input_header("images", "FP32", [count, *SHAPE], SHAPE, 64)


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "message"),
    [
        ("pixels", "FP32", [1, 1, 28, 28], "unknown input 'pixels'"),
        ("images", "UINT8", [1, 1, 28, 28], "must have datatype FP32, got 'UINT8'"),
        ("images", "FP32", [1, 28, 28], "must have shape [N, 1, 28, 28], got [1, 28, 28]"),
        ("images", "FP32", [-1, 1, 28, 28], "must have shape [N, 1, 28, 28]"),
        ("images", "FP32", [1.0, 1, 28, 28], "shape must be a list of integers"),
        ("images", "FP32", [True, 1, 28, 28], "shape must be a list of integers"),
        ("images", "FP32", "1,1,28,28", "shape must be a list of integers"),
        ("images", "FP32", [0, 1, 28, 28], "holds no image (N = 0)"),
    ],
)
def test_check_input_header_refuses(name: str, datatype: str, shape: object, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_input_header(name, datatype, shape, SHAPE, 64)
    assert message in caught.value.message


def test_more_images_than_the_limit_is_413() -> None:
    with pytest.raises(TooManyImages, match="at most 64 images per request, got 65"):
        check_input_header("images", "FP32", [65, *SHAPE], SHAPE, 64)


def test_a_huge_declared_shape_is_refused_before_any_allocation() -> None:
    with pytest.raises(InvalidInput, match="must have shape"):
        check_input_header("images", "FP32", [1, 1, 2**40, 2**40], SHAPE, 64)


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=-3, max_value=3))
def test_tensor_from_bytes_takes_exactly_the_declared_byte_count(count: int, delta: int) -> None:
    expected = np.random.default_rng(count).random((count, *SHAPE), dtype=np.float32)
    data = expected.tobytes()
    h = header(count)
    if delta == 0:
        np.testing.assert_array_equal(tensor_from_bytes(data, h), expected)
        return
    data = data + b"\0" * delta if delta > 0 else data[:delta]
    with pytest.raises(InvalidInput, match=f"needs {count * 3136} bytes, got {len(data)}"):
        tensor_from_bytes(data, h)


def test_tensor_from_values_takes_flat_or_nested_numbers() -> None:
    values = np.linspace(0, 1, 2 * 784, dtype=np.float32).reshape(2, *SHAPE)
    np.testing.assert_array_equal(tensor_from_values(values.ravel().tolist(), header()), values)
    np.testing.assert_array_equal(tensor_from_values(values.tolist(), header()), values)
    for bad, message in [
        ([[0.5] * 784, [0.5] * 783], "not a rectangular array|needs 1568 values"),
        ([True] * 1568, "numbers only"),
        ([None] * 1568, "numbers only"),
        ("0.5", "must be a list"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            tensor_from_values(bad, header())


def test_parse_options() -> None:
    assert parse_options({"target_fpr": 0.01, "mode": "enforce", "other": 1}).mode == "enforce"
    for parameters, message in [
        ({"target_fpr": "0.1"}, "must be a number"),
        ({"target_fpr": True}, "must be a number"),
        ({"target_fpr": float("nan")}, r"must lie in \(0, 1\)"),
        ({"target_fpr": 1}, r"must lie in \(0, 1\)"),
        ({"mode": "strict"}, "must be 'annotate' or 'enforce'"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            parse_options(parameters)


def test_select_outputs_always_appends_the_verdict() -> None:
    assert select_outputs(None, "log_kd") == list(OUTPUT_NAMES)
    assert select_outputs(["label"], "log_kd") == ["label", "accepted", "log_kd"]
    assert select_outputs(["accepted", "log_kd"], "log_kd") == ["accepted", "log_kd"]
    assert select_outputs([], "non_me") == ["accepted", "non_me"]
    with pytest.raises(InvalidInput, match="requested twice"):
        select_outputs(["label", "label"], "log_kd")


def test_binary_outputs_are_little_endian_and_bool_is_one_byte() -> None:
    assert little_endian_bytes(np.array([True, False])) == b"\x01\x00"
    assert little_endian_bytes(np.array([1], dtype=">i8")) == (1).to_bytes(8, "little")
    assert little_endian_bytes(np.array([[1.5]], np.float32)) == np.float32(1.5).tobytes()
