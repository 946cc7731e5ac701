"""Whole models: the catalog's ``[[model]]`` entries, each named by its name_prefix.

    GET /models/{prefix}            its layers by module path
    GET /models/{prefix}/state      their state as one safetensors file, keyed by module path

Read access: a model's state is what ``/stats`` shows of its layers, plus their weights.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from ...core.errors import NAME_PATTERN
from ..deps import EngineDep, ReadAccess
from ..responses import BINARY, json_response
from ..schemas import ModelEntry, errors

router = APIRouter(prefix="/models", tags=["models"], dependencies=[ReadAccess])

ModelPrefix = Annotated[str, Path(
    pattern=f"^{NAME_PATTERN}$",
    description="A [[model]] entry's name_prefix, such as 'digits.'")]


@router.get("/{prefix}", response_model=ModelEntry, responses=errors(401, 403, 404, 422))
def model_layers(prefix: ModelPrefix, engine: EngineDep) -> Response:
    """Which served layer stands for each module of the model."""
    return json_response({"name_prefix": prefix, "layers": engine.model_layers(prefix)})


@router.get(
    "/{prefix}/state",
    responses={200: {"content": {BINARY: {}}}, **errors(401, 403, 404, 422)},
    response_class=Response,
)
def model_state(prefix: ModelPrefix, engine: EngineDep) -> Response:
    """The model's served state as safetensors, keyed as the model's own ``state_dict``
    (``features.1.running_mean``, ...): load it with ``load_state_dict(..., strict=False)``."""
    filename = prefix.strip(".") or "model"
    return Response(
        engine.export_model(prefix), media_type=BINARY,
        headers={"Content-Disposition": f'attachment; filename="{filename}.safetensors"'},
    )
