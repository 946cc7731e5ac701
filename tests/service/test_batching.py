"""Dynamic batching: merged eval requests get exactly the answers they would get alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.app import create_app
from service.settings import Settings

SHAPES = {
    "digits.bn1": (3, 16, 4, 4), "digits.head.bn": (5, 64), "features.ln": (2, 7, 64),
    "features.rms": (4, 64), "features.gn": (3, 32, 5), "features.in": (2, 16, 6),
}


def _app(batch: int):
    return create_app(Settings(threads=1, device="cpu", batch_max_size=batch,
                               batch_max_delay_ms=50))


async def _outcomes(app, name: str, inputs: list[torch.Tensor]):
    async with app.router.lifespan_context(app):
        engine = app.state.engine
        if app.state.batcher is None:
            return [engine.normalize(name, x, "eval") for x in inputs]
        assert all(engine.can_batch(name, x) for x in inputs)
        return await asyncio.gather(*(app.state.batcher.evaluate(name, x) for x in inputs))


@pytest.mark.parametrize("name", SHAPES)
def test_merged_eval_requests_equal_separate_ones(name: str) -> None:
    rng = np.random.default_rng(0)
    inputs = [torch.from_numpy(rng.normal(1, 2, SHAPES[name]).astype(np.float32)
                               [: 1 + i % SHAPES[name][0]].copy()) for i in range(6)]
    alone = asyncio.run(_outcomes(_app(0), name, inputs))
    merged = asyncio.run(_outcomes(_app(8), name, inputs))
    for a, m in zip(alone, merged, strict=True):
        torch.testing.assert_close(m.output, a.output, atol=1e-6, rtol=1e-6)
        assert m.stats.keys() == a.stats.keys()
        for key in a.stats:
            torch.testing.assert_close(m.stats[key], a.stats[key], atol=1e-6, rtol=1e-6,
                                       equal_nan=True)


def test_batches_close_at_max_size_and_count_every_request() -> None:
    app = _app(4)
    inputs = [torch.randn(2, 64) for _ in range(10)]

    async def run():
        async with app.router.lifespan_context(app):
            calls = []
            engine = app.state.engine
            original = engine.evaluate_many

            def spy(name, xs):
                calls.append(len(xs))
                return original(name, xs)

            engine.evaluate_many = spy
            await asyncio.gather(*(app.state.batcher.evaluate("features.ln", x) for x in inputs))
            return calls, engine.store.slot("features.ln").requests["eval"]

    calls, counted = asyncio.run(run())
    assert calls == [4, 4, 2]  # two full batches, then the rest when the delay runs out
    assert counted == 10


def test_inputs_a_layer_cannot_merge_are_not_merged() -> None:
    app = _app(8)

    async def run():
        async with app.router.lifespan_context(app):
            engine = app.state.engine
            return (engine.can_batch("features.ln", torch.randn(64)),
                    engine.can_batch("features.in", torch.randn(16, 6)),
                    engine.can_batch("features.ln", torch.randn(2, 64, dtype=torch.float64)),
                    engine.can_batch("features.ln", torch.randn(2, 64)))

    assert asyncio.run(run()) == (False, False, False, True)


def test_train_requests_are_never_merged() -> None:
    from fastapi.testclient import TestClient

    from .reference import tensor

    with TestClient(_app(8)) as client:
        x = np.ones((4, 64), np.float32)
        for _ in range(3):
            body = client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                                   "tensor": tensor(x)}).json()
        assert body["num_batches_tracked"] == 3
