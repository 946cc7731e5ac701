"""The gRPC messages and codec without a server: the committed descriptor set is the
.proto's, every message, field and RPC has the protocol's name and number (tritonclient's
own descriptors are the reference), and malformed infer requests are refused by name."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from service.core.errors import InvalidRequestError
from service.wire import v2_grpc
from service.wire.proto import DESCRIPTOR_SET, METHODS, PACKAGE, SERVICE, messages, pool
from service.wire.tensors import Limits
from tests.server_process import ROOT

OUTPUTS = ("output", "batch_mean", "batch_var")


def test_the_committed_descriptor_set_is_the_protos(tmp_path) -> None:
    out = tmp_path / "inference.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "service/wire/proto",
                    f"--descriptor_set_out={out}", "inference.proto"], cwd=ROOT, check=True,
                   timeout=60)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    committed = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    assert fresh == committed, "regenerate inference.binpb (see inference.proto)"


def _reference(full_name: str):
    for module in (service_pb2, model_config_pb2):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise KeyError(full_name)


def _messages(descriptor) -> list:
    return [descriptor, *(m for nested in descriptor.nested_types for m in _messages(nested))]


@pytest.mark.parametrize("name", sorted(vars(messages)))
def test_every_field_has_the_protocols_name_number_and_type(name: str) -> None:
    ours = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
    for message in _messages(ours):
        theirs = _reference(message.full_name)
        for field in message.fields:
            reference = theirs.fields_by_name[field.name]
            assert (field.number, field.type, field.is_repeated) == (
                reference.number, reference.type, reference.is_repeated), field.full_name
            if field.message_type is not None:
                assert field.message_type.full_name == reference.message_type.full_name


def test_every_rpc_is_the_protocols() -> None:
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert theirs.full_name == SERVICE
    for name in METHODS:
        ours = pool.FindServiceByName(SERVICE).methods_by_name[name]
        reference = theirs.methods_by_name[name]
        assert ours.input_type.full_name == reference.input_type.full_name
        assert ours.output_type.full_name == reference.output_type.full_name
        assert not ours.client_streaming
        assert not ours.server_streaming


def _request(datatype="FP32", shape=(2, 64), raw: bytes | None = None, **params):
    request = messages.ModelInferRequest(model_name="stream.bn", id="req-1")
    request.inputs.add(name="x", datatype=datatype, shape=list(shape))
    if raw is None:
        raw = np.ones(shape, np.float32).tobytes()
    if raw:
        request.raw_input_contents.append(raw)
    for key, value in params.items():
        request.parameters[key].string_param = value
    return request


def test_a_raw_request_decodes_to_a_tensor_it_owns() -> None:
    parsed = v2_grpc.decode_infer_request(_request(mode="train", request_id="k"), OUTPUTS,
                                          Limits())
    assert parsed.x.shape == (2, 64)
    assert parsed.x.dtype == torch.float32
    assert (parsed.mode, parsed.request_id, parsed.id, parsed.outputs, parsed.typed) == (
        "train", "k", "req-1", ("output",), False)
    parsed.x.add_(1)  # writable: its own memory, not protobuf's


def _refused(request, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        v2_grpc.decode_infer_request(request, OUTPUTS, Limits())


def test_malformed_requests_are_refused_by_name() -> None:
    _refused(_request(raw=b"\0" * 12), "raw_input_contents holds 12 bytes")
    _refused(_request(datatype="INT8"), "datatype 'INT8' is not supported")
    _refused(_request(raw=b""), "exactly one of contents or raw_input_contents")
    _refused(_request(mode="fit"), "mode must be 'eval' or 'train'")
    _refused(_request(shape=(2,) * 9, raw=b""), "rank 9 exceeds")
    two = _request()
    two.inputs.add(name="y", datatype="FP32", shape=[1])
    _refused(two, "exactly one tensor")
    shared = _request()
    shared.inputs[0].parameters["shared_memory_region"].string_param = "r"
    _refused(shared, "shared memory is not supported")
    twice = _request()
    twice.outputs.add(name="output")
    twice.outputs.add(name="output")
    _refused(twice, "requested twice")
    typed_mode = _request()
    typed_mode.parameters["mode"].bool_param = True
    _refused(typed_mode, "parameter mode must be a string")


def test_a_response_keeps_the_input_datatype_and_sends_statistics_as_fp32() -> None:
    parsed = v2_grpc.decode_infer_request(
        _request(datatype="FP16", raw=np.ones((2, 64), np.float16).tobytes()), OUTPUTS,
        Limits())
    parsed = v2_grpc.GrpcInferRequest(parsed.x, "eval", None, "req-1", OUTPUTS, False)
    stats = {"mean": torch.zeros(64), "var": torch.ones(64)}
    reply = v2_grpc.encode_infer_response("stream.bn", "1", parsed, parsed.x, stats)
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("output", "FP16", [2, 64]), ("batch_mean", "FP32", [64]), ("batch_var", "FP32", [64])]
    assert [len(b) for b in reply.raw_output_contents] == [256, 256, 256]
    assert reply.id == "req-1"
    assert reply.parameters["mode"].string_param == "eval"
