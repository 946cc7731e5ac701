"""schemathesis against the app's own OpenAPI schema, in-process (default catalog).

Every generated request, schema-valid or not, must get an answer that the schema
documents - status, content type and body - and never a server error. Two apps: one with
a token that also guards reads (requests carry the token, a wrong one or none), and one
open app that lets NaN/Inf into the running statistics. Generation is derandomized, so a
run is repeatable; example counts keep it bounded.
"""

from __future__ import annotations

import base64
import math
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.core.catalog import load_catalog
from service.settings import Settings

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token-0123456789abcdef"
LAYERS = [spec.name for spec in load_catalog()]
CONFIGS = {
    "token": {"api_token": TOKEN, "protect_reads": True},
    "open": {"allow_non_finite": True},
}
# Mostly the right token, so requests get past it; sometimes a wrong one or none.
AUTH = st.sampled_from([f"Bearer {TOKEN}"] * 4 + ["Bearer not-the-token", None])
# Schema-valid is not always acceptable (a shape that does not match the data, a layer
# that does not exist): the schema cannot say that, so "valid data gets a 2xx" is off.
EXCLUDED = [positive_data_acceptance]
FUZZ = settings(derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


def _schema(config: str):
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(Settings(threads=1, **CONFIGS[config])))

    # Real layer names half of the time, so requests get past the 404s.
    @schema.hook
    def flatmap_body(context, body):
        if isinstance(body, dict) and isinstance(body.get("layer"), str):
            return st.sampled_from([*LAYERS, body["layer"]]).map(lambda n: {**body, "layer": n})
        return st.just(body)

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        if isinstance(path_parameters, dict) and "name" in path_parameters:
            names = st.sampled_from([*LAYERS, path_parameters["name"]])
            return names.map(lambda n: {**path_parameters, "name": n})
        return st.just(path_parameters)

    return schema


@pytest.fixture(params=list(CONFIGS))
def schema(request):
    """A fresh app per test: fuzzing deletes and replaces layers."""
    return _schema(request.param)


def _fuzz(schema, strategy, examples: int) -> Counter:
    sent: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(case=strategy, auth=AUTH)
    def run(case, auth) -> None:
        sent[f"{case.method} {case.path}"] += 1
        case.call_and_validate(headers={"Authorization": auth} if auth else None,
                               excluded_checks=EXCLUDED)

    run()
    return sent


def test_schema_valid_requests_to_every_route(schema) -> None:
    # Route by route: one strategy over all of them may leave a route out by chance.
    operations = [op.ok() for op in schema.get_all_operations()]
    sent: Counter = Counter()
    for operation in operations:
        sent += _fuzz(schema, operation.as_strategy(GenerationMode.POSITIVE), 14)
    assert set(sent) == {f"{op.method.upper()} {op.path}" for op in operations}
    assert sum(sent.values()) >= 10 * len(operations)


def test_schema_invalid_requests_are_4xx(schema) -> None:
    sent = _fuzz(schema, schema.as_strategy(GenerationMode.NEGATIVE), 200)
    assert sum(sent.values()) >= 150


# --- tensors that fit the layers: the deeper paths of /normalize --------------------------

# (channels at dim 1 or the last dim, channel count) for the default catalog's layers
_FEATURES = {
    "digits.bn1": (1, 16), "digits.bn2": (1, 32), "digits.bn3": (1, 64),
    "digits.head.bn": (1, 64), "features.ln": (-1, 64), "features.rms": (-1, 64),
    "features.gn": (1, 32), "features.in": (1, 16), "stream.bn": (1, 64),
}
_RANK = {"digits.bn1": 4, "digits.bn2": 4, "digits.bn3": 4, "digits.head.bn": 2,
         "stream.bn": 2, "features.in": 3}
_MAX = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38, "float64": 1.7e308}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@st.composite
def _tensors(draw) -> dict:
    layer = draw(st.sampled_from(sorted(_FEATURES)))
    dim, channels = _FEATURES[layer]
    rank = _RANK.get(layer) or draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    shape[dim] = channels
    dtype = draw(st.sampled_from(sorted(_MAX)))
    size = math.prod(shape)
    if draw(st.booleans()):  # raw bytes: every bit pattern, NaN and Inf included
        raw = draw(st.binary(min_size=size * _ITEMSIZE[dtype], max_size=size * _ITEMSIZE[dtype]))
        tensor = {"shape": shape, "dtype": dtype, "b64": base64.b64encode(raw).decode()}
    else:
        scale = draw(st.sampled_from([1.0, 1e4, _MAX[dtype] / 2]))
        values = st.floats(-scale, scale, allow_nan=False, allow_infinity=False)
        tensor = {"shape": shape, "dtype": dtype,
                  "data": draw(st.lists(values, min_size=size, max_size=size))}
    return {"layer": layer, "mode": draw(st.sampled_from(["eval", "train"])), "tensor": tensor,
            "output_encoding": draw(st.sampled_from([None, "list", "b64"]))}


def test_normalize_with_tensors_that_fit_the_layers(schema) -> None:
    operation = schema["/normalize"]["POST"]
    statuses: Counter = Counter()

    @settings(FUZZ, max_examples=150)
    @given(body=_tensors())
    def run(body: dict) -> None:
        case = operation.Case(body=body, media_type="application/json")
        reply = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                                       excluded_checks=EXCLUDED)
        statuses[reply.status_code] += 1

    run()
    # Non-finite training (refused unless allowed) and single-value batches are the 422s.
    assert set(statuses) <= {200, 422}
    assert statuses[200] >= 50
    # The statistics those steps left (NaN among them where allowed) still fit the schema.
    stats = schema["/stats/{name}"]["GET"]
    for layer in _FEATURES:
        reply = stats.Case(path_parameters={"name": layer}).call_and_validate(
            headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200
