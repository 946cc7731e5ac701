"""64 train requests at once on one layer, with eval requests among them, on the real server.

Every train step must be applied exactly once, and no eval may see (or cause) a half-applied
update. The batches are built so that any fully applied state is recognisable: batch ``i``
has per-channel mean ``a_i * p_c`` and unbiased variance ``a_i + 1`` in every channel, so
with cumulative momentum every state the layer passes through (including torch's initial
0/1) has ``running_var_c - running_mean_c / p_c == 1`` in every channel. A step that was
half applied (one buffer, or some channels) breaks that.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import httpx
import pytest
import torch

from normcore import BatchNorm1d
from service.core.catalog import load_catalog
from service.state.store import Store
from tests.server_process import service_process

TRAINS = 64
EVALS_PER_TRAIN = 2
ROWS = 16
P = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)  # per-channel pattern of the means


def _tensor(x: torch.Tensor) -> dict:
    x = x.to(torch.float32).contiguous()
    return {"shape": list(x.shape), "dtype": "float32",
            "b64": base64.b64encode(x.numpy().tobytes()).decode()}


def _decode(tensor: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(tensor["b64"]))
    return torch.frombuffer(raw, dtype=torch.float32).reshape(tensor["shape"]).double()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(ROWS, generator=g, dtype=torch.float64)
    z = (z - z.mean()) / z.std()  # mean 0, unbiased variance 1, exactly enough
    batches = []
    for i in range(TRAINS):
        a = 0.25 + 0.125 * i
        batches.append(a * P + (a + 1) ** 0.5 * z[:, None] * torch.ones(64, dtype=torch.float64))
    return batches


def _invariant(eval_response: dict) -> float:
    """Largest deviation from the invariant in the state an eval of [0-row, 1-row, ...]
    saw."""
    out = _decode(eval_response["output"])
    scale = out[1] - out[0]  # 1 / sqrt(running_var + eps), weight 1 and bias 0
    running_var = 1 / scale**2 - 1e-5
    running_mean = -out[0] / scale
    return float((running_var - running_mean / P - 1).abs().max())


async def _burst(url: str, batches: list[torch.Tensor]) -> tuple[list[dict], list[dict]]:
    # Rows 0 and 1 read the state; the padding makes the evals big enough to run in the
    # thread pool beside the train steps rather than on the event loop.
    probe = _tensor(torch.cat([torch.zeros(1, 64), torch.ones(1, 64), torch.randn(300, 64)]))
    limits = httpx.Limits(max_connections=(1 + EVALS_PER_TRAIN) * TRAINS)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        async def train(x: torch.Tensor) -> dict:
            r = await client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                                      "tensor": _tensor(x)})
            assert r.status_code == 200, r.text
            return r.json()

        async def evaluate() -> dict:
            r = await client.post("/normalize", json={"layer": "stream.bn", "mode": "eval",
                                                      "tensor": probe, "output_encoding": "b64"})
            assert r.status_code == 200, r.text
            return r.json()

        before = (await client.get("/stats/stream.bn")).json()
        tasks = []
        for x in batches:
            tasks += [train(x), *(evaluate() for _ in range(EVALS_PER_TRAIN))]
        results = await asyncio.gather(*tasks)
        after = (await client.get("/stats/stream.bn")).json()
    return [before, after], [r for r in results if r["mode"] == "eval"]


@pytest.mark.parametrize("durability", ["memory", "durable"])
def test_concurrent_train_requests_apply_exactly_once(tmp_path: Path, durability: str) -> None:
    args = ["--state-dir", str(tmp_path / "state")] if durability == "durable" else []
    batches = _batches()
    with service_process(args, log=tmp_path / "server.log") as server:
        (before, after), evals = asyncio.run(_burst(server.url, batches))
    assert before["num_batches_tracked"] == 0
    assert after["num_batches_tracked"] == TRAINS
    # Cumulative momentum: the running statistics are the plain means of the batch ones.
    means = torch.stack([b.mean(0) for b in batches])
    variances = torch.stack([b.var(0, unbiased=True) for b in batches])
    torch.testing.assert_close(torch.tensor(after["running_mean"], dtype=torch.float64),
                               means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(after["running_var"], dtype=torch.float64),
                               variances.mean(0), rtol=1e-5, atol=1e-5)
    worst = max(_invariant(e) for e in evals)
    assert worst < 1e-3, f"an eval saw a half-applied update (deviation {worst})"


def test_eval_during_a_train_step_sees_the_state_before_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: a train step is paused after updating its copy of the layer."""
    store = Store(torch.device("cpu"))
    for spec in load_catalog():
        store.put(spec, record=False)
    updated, resume = threading.Event(), threading.Event()
    original = BatchNorm1d.normalize

    def paused(self, x, train=None):
        result = original(self, x, train)
        if train:
            updated.set()
            resume.wait(10)
        return result

    monkeypatch.setattr(BatchNorm1d, "normalize", paused)
    before = {k: v.clone() for k, v in store.slot("stream.bn").layer.state_dict().items()}
    step = threading.Thread(target=store.train, args=("stream.bn", torch.randn(8, 64) + 3))
    step.start()
    assert updated.wait(10)
    seen = store.slot("stream.bn").layer.state_dict()
    for key, value in before.items():
        assert torch.equal(seen[key], value), key  # nothing of the step shows yet
    store.evaluate("stream.bn", torch.randn(4, 64))  # and an eval meanwhile changes nothing
    resume.set()
    step.join(10)
    after = store.slot("stream.bn").layer
    assert int(after.num_batches_tracked) == 1
    assert not torch.equal(after.running_mean, before["running_mean"])


def test_a_request_that_goes_away_leaves_its_step_to_finish() -> None:
    """The route awaits a durable step through ``_settled``: cancelling the request must not
    cancel the step, and a step settled on the loop or in another thread hands over."""
    from concurrent.futures import Future

    from service.http.deps import _settled

    async def scenario() -> tuple[str, str]:
        gone, on_loop, elsewhere = Future(), Future(), Future()
        request = asyncio.ensure_future(_settled(gone))
        await asyncio.sleep(0)
        request.cancel()  # the client went away
        await asyncio.sleep(0)
        assert not gone.cancelled()
        gone.set_result("applied")  # the step finishes all the same
        waiting = asyncio.ensure_future(_settled(on_loop))
        await asyncio.sleep(0)
        on_loop.set_result("settled on the loop")  # as the journal settles a group
        threading.Thread(target=elsewhere.set_result, args=("settled in a thread",)).start()
        return await waiting, await _settled(elsewhere)

    assert asyncio.run(scenario()) == ("settled on the loop", "settled in a thread")
