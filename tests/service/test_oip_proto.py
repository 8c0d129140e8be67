"""service/oip/oip.proto speaks the published protocol: every field it declares has the number,
type and cardinality of the same field in the protos tritonclient ships (Triton's
grpc_service.proto and model_config.proto), and the committed oip_pb2.py is what the code
generator makes of oip.proto today."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from service.oip import oip_pb2
from tests.conftest import ROOT

PROTO = ROOT / "service" / "oip" / "oip.proto"


def published(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        pool = module.DESCRIPTOR.pool
        try:
            found: Descriptor = pool.FindMessageTypeByName(f"inference.{name}")
        except KeyError:
            continue
        return found
    raise AssertionError(f"inference.{name} is not in the published protocol")


def ours() -> list[Descriptor]:
    found: list[Descriptor] = []

    def walk(message: Descriptor) -> None:
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in oip_pb2.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    return found


@pytest.mark.parametrize("message", ours(), ids=lambda m: m.full_name)
def test_every_field_is_the_published_one(message: Descriptor) -> None:
    name = message.full_name.removeprefix("rcegate.oip.")
    theirs = published(name)
    for field in message.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{name}.{field.name} is not in the published protocol"
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), f"{name}.{field.name}"
        if field.message_type is not None:
            assert field.message_type.full_name.removeprefix("rcegate.oip.") == (
                other.message_type.full_name.removeprefix("inference.")
            )


def test_the_data_types_are_the_published_ones() -> None:
    ours_: EnumDescriptor = oip_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    theirs = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in ours_.values} == {v.name: v.number for v in theirs.values}


def test_a_published_request_parses_as_ours() -> None:
    request = service_pb2.ModelInferRequest(model_name="m", model_version="1", id="x")
    request.parameters["target_fpr"].double_param = 0.01
    request.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    request.outputs.add(name="label")
    request.raw_input_contents.append(b"\0" * 3136)
    parsed = oip_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert parsed.SerializeToString() == request.SerializeToString()
    assert parsed.parameters["target_fpr"].double_param == 0.01


def strip_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    def walk(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            walk(nested)

    for message in file.message_type:
        walk(message)


def test_the_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "oip.desc"
    status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)])
    assert status == 0
    generated = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    strip_json_names(generated)  # the generated module leaves them out
    committed = descriptor_pb2.FileDescriptorProto.FromString(oip_pb2.DESCRIPTOR.serialized_pb)
    assert committed == generated, "run scripts/gen-proto and commit service/oip/oip_pb2.py*"
