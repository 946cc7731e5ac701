"""V2 protocol models for the OpenAPI schema (``/openapi.json``, ``/docs``).

The infer route reads its body itself (binary tensors, compression, no Content-Type from
tritonclient); these models document the JSON part of the same contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Datatype = Literal["FP32", "FP16", "BF16", "FP64"]


class MetadataServer(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a free dimension.")


class MetadataModel(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class RequestInput(BaseModel):
    name: str = Field(description="Any name: a model takes one input.")
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_size": n} when the tensor follows the JSON header.'
    )
    data: list[Any] | None = Field(None, description="Row-major numbers, flat or nested.")


class RequestOutput(BaseModel):
    name: Literal["output", "batch_mean", "batch_var", "batch_mean_square"]
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true}')


class InferenceRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 128}],
        "parameters": {"mode": "eval"},
    }})

    id: str | None = Field(None, description="Echoed in the response.")
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = Field(
        None, description="Default: output alone. Batch statistics are FP32."
    )
    parameters: dict[str, Any] | None = Field(None, description=(
        "mode: eval (default) or train (updates running statistics; needs the token); "
        "request_id: idempotency key of a train request; binary_data_output: default for "
        "outputs that do not say."
    ))


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_size": n} when the tensor follows the JSON header.'
    )
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="mode, and num_batches_tracked after a train request."
    )
    outputs: list[ResponseOutput]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with nested models written out in place, for an
    ``openapi_extra`` body whose nested models appear nowhere else in the document."""
    schema = model.model_json_schema()
    return _inline(schema, schema.get("$defs", {}))
