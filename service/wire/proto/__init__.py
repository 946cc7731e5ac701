"""The protobuf messages of ``inference.proto`` (KServe V2 over gRPC), built at import from
the descriptor set next to it, in a descriptor pool of their own.

NOTE: protoc's generated ``_pb2`` modules register their messages in protobuf's one default
pool, where a second definition of ``inference.ModelInferRequest`` is an error: importing
them next to tritonclient's (a test, a user's script) would fail. A private pool keeps the
protocol's own package and names, and needs no generated Python (nor its protobuf version
check): ``messages.ModelInferRequest`` is a class like any generated one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
DESCRIPTOR_SET = Path(__file__).with_name("inference.binpb")


def _load() -> tuple[descriptor_pool.DescriptorPool, SimpleNamespace]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.AddSerializedFile(file.SerializeToString())
    (file,) = files.file
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{PACKAGE}.{name}")) for name in (m.name for m in file.message_type)}
    return pool, SimpleNamespace(**classes)


pool, messages = _load()
# RPC name -> (request class, response class), as the service declares them.
METHODS = {
    method.name: (getattr(messages, method.input_type.name),
                  getattr(messages, method.output_type.name))
    for method in pool.FindServiceByName(SERVICE).methods
}
DATA_TYPES = pool.FindEnumTypeByName(f"{PACKAGE}.DataType")
