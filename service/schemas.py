"""Request and response models for the OpenAPI schema (``/openapi.json``, ``/docs``).

The hot routes parse bodies with orjson and check them in ``service.codec`` rather than
validating every element through pydantic; these models document the same contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "float16", "bfloat16", "float64"]

_TENSOR_EXAMPLE = {"shape": [2, 3], "dtype": "float32", "data": [[0.1, 0.2, 0.3], [1, 2, 3]]}


class Tensor(BaseModel):
    """A tensor: ``data`` (flat or nested numbers) or ``b64`` (little-endian bytes)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": _TENSOR_EXAMPLE})

    shape: list[int] = Field(description="Dimensions, row-major.")
    dtype: Dtype = "float32"
    data: list[Any] | None = Field(None, description="Numbers, flat or nested like shape.")
    b64: str | None = Field(None, description="Base64 of the little-endian bytes.")


class NormalizeRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"layer": "features.ln", "mode": "eval",
                        "tensor": {"shape": [2, 64], "dtype": "float32", "data": [0.5] * 128}}
        }
    )

    layer: str = Field(description="Name of a served layer.")
    mode: Literal["eval", "train"] = Field(
        "eval", description="train folds the batch statistics into the running statistics."
    )
    tensor: Tensor
    output_encoding: Literal["list", "b64"] | None = Field(
        None, description="Defaults to the encoding of the request's tensor."
    )
    request_id: str | None = Field(
        None, max_length=128, description="Idempotency key for train requests."
    )


class NormalizeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "layer": "stream.bn", "mode": "train",
                "output": {"shape": [2, 2], "dtype": "float32", "data": [-1, -1, 1, 1]},
                "batch_stats": {
                    "mean": {"shape": [2], "dtype": "float32", "data": [0.5, 1.5]},
                    "var": {"shape": [2], "dtype": "float32", "data": [0.25, 0.25]},
                },
                "num_batches_tracked": 1,
            }
        }
    )

    layer: str
    mode: Literal["eval", "train"]
    output: Tensor
    batch_stats: dict[str, Tensor] = Field(
        description="mean and biased var of the batch (mean_square for RMSNorm)."
    )
    num_batches_tracked: int | None = Field(None, description="After a train request.")


class LayerEntry(BaseModel):
    kind: str
    device: str
    config: dict[str, Any]
    checkpoint: str | None
    requests: dict[str, int]
    rejected: int
    last_update: str | None
    running_mean: list[float] | None = None
    running_var: list[float] | None = None
    num_batches_tracked: int | None = None


class StatsResponse(BaseModel):
    layers: dict[str, LayerEntry]
    server: dict[str, Any]


class LayerCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"kind": "BatchNorm1d", "config": {"num_features": 8}}},
    )

    kind: str = Field(description="A normcore layer class, e.g. BatchNorm2d.")
    config: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments.")
    checkpoint_b64: str | None = Field(None, description="Base64 of a safetensors file.")
    prefix: str = Field("", max_length=512, description="Key prefix inside the checkpoint.")
    device: str | None = None


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, in words.")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    return {status: {"model": ErrorBody, "description": "Error"} for status in statuses}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema(
                ref_template="#/components/schemas/{model}")}},
        }
    }
