"""service/oip/wire.py: a ModelInferRequest is bounded on its bytes before it is parsed."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.oip import oip_pb2 as pb
from service.oip.wire import INFER_REQUEST, MAX_FIELDS, NAMED_REQUEST, check

UNPACKED_SHAPE = b"\x0a\x06images" + b"\x18\x01" * 17  # inputs[0]: 17 shape varints


def message() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mnist-rce", id="7")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[2, 1, 28, 28])
    tensor.contents.fp32_contents.extend([0.5] * (2 * 784))  # packed: one field
    request.outputs.add(name="label").parameters["binary_data"].bool_param = True
    request.parameters["mode"].string_param = "enforce"
    request.raw_input_contents.append(b"\0" * 6272)
    return request


def test_what_tritonclient_sends_passes() -> None:
    check(message().SerializeToString(), INFER_REQUEST, "ModelInferRequest")
    check(pb.ModelReadyRequest(name="m", version="2").SerializeToString(), NAMED_REQUEST, "M")


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (
            b"".join(
                pb.ModelInferRequest(
                    parameters={f"p{i}": pb.InferParameter(bool_param=True)}
                ).SerializeToString()
                for i in range(65)
            ),
            "ModelInferRequest.parameters: more than 64 entries",
        ),
        (
            b"\x2a" + bytes([len(UNPACKED_SHAPE)]) + UNPACKED_SHAPE,
            "ModelInferRequest.inputs.shape: more than 16 entries",
        ),
        (b"\x1a\x82\x08" + b"x" * 1026, "ModelInferRequest.id: 1026 bytes, more than the 1024"),
        (b"\xa0\x01\x01" * (MAX_FIELDS + 1), f"holds more than {MAX_FIELDS} fields"),
        (b"\x0a\xff", "not valid protobuf: a truncated or over-long varint"),
        (b"\x0a\x05ab", "not valid protobuf: a length past the end of its message"),
        (b"\x0b", "not valid protobuf: wire type 3 (groups are not part of this protocol)"),
        (b"\x00\x01", "not valid protobuf: field number 0"),
    ],
    ids=[
        "parameters",
        "unpacked-shape",
        "long-id",
        "unknown-fields",
        "varint",
        "length",
        "group",
        "field-zero",
    ],
)
def test_bounds_refuse_before_any_parsing(data: bytes, refusal: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check(data, INFER_REQUEST, "ModelInferRequest")
    assert refusal in caught.value.message
