"""``PUT /layers/{name}`` bodies -> values: a layer's kind, configuration and optional
checkpoint (base64 of a safetensors file)."""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import InvalidRequestError, shown
from .tensors import Limits, parse_json


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
    drift_threshold: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True,
        description="Eval batches whose drift score goes over this are counted and logged.")


@dataclass(frozen=True)
class LayerRequest:
    kind: str
    config: dict[str, Any]
    checkpoint: bytes | None  # the safetensors file
    prefix: str
    device: str | None
    drift_threshold: float | None


def decode_layer_request(body: bytes | bytearray, limits: Limits) -> LayerRequest:
    payload = parse_json(body, limits)
    try:
        spec = LayerCreate.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(shown(p) if isinstance(p, str) else str(p) for p in first["loc"])
        raise InvalidRequestError(f"{where or 'body'}: {first['msg']}") from None
    checkpoint = None
    if spec.checkpoint_b64 is not None:
        try:
            checkpoint = binascii.a2b_base64(spec.checkpoint_b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError("checkpoint_b64 is not valid base64") from None
    return LayerRequest(spec.kind, spec.config, checkpoint, spec.prefix, spec.device,
                        spec.drift_threshold)
