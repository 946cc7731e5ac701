"""Request and response models for the OpenAPI schema (``/openapi.json``, ``/docs``).

The hot routes parse bodies with orjson and check them in ``service.wire`` rather than
validating every element through pydantic; these models document the same contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "float16", "bfloat16", "float64"]

_TENSOR_EXAMPLE = {"shape": [2, 3], "dtype": "float32", "data": [[0.1, 0.2, 0.3], [1, 2, 3]]}


class _TensorBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: list[Annotated[int, Field(ge=0)]] = Field(description="Dimensions, row-major.")
    dtype: Dtype = "float32"


class ListTensor(_TensorBase):
    """A tensor as JSON numbers (no NaN, Infinity, booleans or null)."""

    model_config = ConfigDict(json_schema_extra={"example": _TENSOR_EXAMPLE})

    data: list[float | list[Any]] = Field(description="Numbers, flat or nested like shape.")


class B64Tensor(_TensorBase):
    """A tensor as base64 of its little-endian bytes, row-major."""

    b64: str = Field(description="Base64 of the little-endian bytes.")


# Exactly one of data or b64: each model forbids the other's field.
Tensor = ListTensor | B64Tensor


class OutputListTensor(_TensorBase):
    """A result as flat JSON numbers; null stands for NaN or an infinity (JSON has neither)."""

    data: list[float | None] = Field(description="Numbers, flat, row-major.")


OutputTensor = OutputListTensor | B64Tensor


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
        None, min_length=1, max_length=128, description="Idempotency key for train requests."
    )


class DriftChannel(BaseModel):
    channel: int = Field(description="Channel (feature) index.")
    score: float = Field(description="Its symmetric KL divergence J_c.")


class BatchDrift(BaseModel):
    score: float | None = Field(description=(
        "Mean over channels of the symmetric KL divergence between the batch's per-channel "
        "Gaussian and the reference's: 0 for equal statistics, 1 for a mean moved by one "
        "standard deviation, 1.125 for a variance 4x; about 2/m for a batch like the "
        "reference (m values per channel). null without a reference yet, with one value "
        "per channel, or non-finite statistics."))
    channels: list[DriftChannel] = Field(description="The channels that moved most.")


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
    output: OutputTensor
    batch_stats: dict[str, OutputTensor] = Field(
        description="mean and biased var of the batch (mean_square for RMSNorm)."
    )
    num_batches_tracked: int | None = Field(None, description="After a train request.")
    drift: BatchDrift | None = Field(None, description="After an eval request.")


class DriftEntry(BaseModel):
    reference: Literal["running", "inputs"] = Field(description=(
        "What scores compare with: the running statistics, or (layers without them: "
        "LayerNorm, RMSNorm, GroupNorm, untracked BatchNorm/InstanceNorm) an exponential "
        "average of the per-feature statistics of the eval inputs served."))
    score: float | None = Field(description="The latest eval batch's score.")
    ema: float | None = Field(description="Exponential average of the scores (weight 0.1).")
    max: float | None
    scored: int = Field(description="Eval batches scored.")
    threshold: float | None = Field(description="drift_threshold, if set.")
    crossings: int = Field(description="Times a score went over the threshold.")
    channels: list[DriftChannel] = Field(description="The latest score's top channels.")
    history: list[tuple[float, float]] = Field(
        description="The latest scores as [seconds since the epoch, score], oldest first.")
    reference_batches: int | None = Field(None, description="Inputs in the average.")
    reference_mean: list[float] | None = None
    reference_var: list[float] | None = Field(None, description="Unbiased.")


class LayerEntry(BaseModel):
    kind: str
    device: str
    config: dict[str, Any]
    checkpoint: str | None
    requests: dict[str, int]
    rejected: int
    last_update: str | None
    running_mean: list[float | None] | None = Field(
        None, description="null entries stand for NaN/Inf (only with allow_non_finite).")
    running_var: list[float | None] | None = None
    num_batches_tracked: int | None = None
    summarized: bool | None = Field(
        None, description="In /stats: the running statistics of a wide layer are left out; "
        "/stats/{name} has them.")
    drift: DriftEntry


class StatsResponse(BaseModel):
    layers: dict[str, LayerEntry]
    server: dict[str, Any]


class ModelEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "name_prefix": "digits.",
        "layers": {"features.1": "digits.bn1", "head.2": "digits.head.bn"}}})

    name_prefix: str
    layers: dict[str, str] = Field(description="Module path in the model -> served layer.")


class Deleted(BaseModel):
    deleted: str = Field(description="The layer no longer served.")


class Health(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded"] = Field(
        description="degraded: eval is served, changes are refused (see persistence).")
    layers: int = Field(description="Layers served.")
    persistence: str = Field(description='"memory", "durable", or why changes are refused.')


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


def with_request_models(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add the models that ``json_body`` bodies refer to (their ``$defs``) to
    ``components/schemas``, where those references point."""
    models = openapi.setdefault("components", {}).setdefault("schemas", {})
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                for name, schema in media.get("schema", {}).get("$defs", {}).items():
                    models.setdefault(name, schema)
    return openapi


BEARER = "bearer"
# Open to everyone, whatever the settings: probes and the protocol's server-level calls.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2", "/v2/health/live", "/v2/health/ready"})


def with_bearer_scheme(openapi: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer token, so /docs has an Authorize button and generated clients send
    it. Whether a route needs it depends on the settings (a token set; reads protected) and,
    for normalize and infer, on the mode, so every other route lists it as optional."""
    schemes = openapi.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "NORMCORE_API_TOKEN: needed for state changes when the server has a "
        "token, and for reads too with NORMCORE_PROTECT_READS.",
    }
    for path, operations in openapi.get("paths", {}).items():
        for operation in operations.values():
            operation["security"] = [] if path in OPEN_PATHS else [{BEARER: []}, {}]
    return openapi
