"""Dynamic batching: concurrent eval requests for the same layer, arriving within a short
window, are normalized in one layer call and answered separately.

Only eval requests are merged (a train step's statistics belong to its own batch), and only
requests whose inputs agree in every dim but the first (and in dtype). A batch closes when
it holds ``max_size`` requests or ``max_delay`` seconds after its first one, whichever
comes first. Off by default: on a CPU the merge costs about what it saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from .engine import Engine, Outcome

# Runs fn(*args) inline or in the thread pool (the HTTP layer's run_step): the batcher
# itself knows nothing of threads. Merged evals change nothing, so they have no deadline.
Runner = Callable[..., Awaitable[list[Outcome]]]


@dataclass
class _Batch:
    name: str
    inputs: list[torch.Tensor] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class EvalBatcher:
    """Merges concurrent eval requests; one instance per app, used from its event loop."""

    def __init__(self, engine: Engine, run: Runner, max_size: int, max_delay: float) -> None:
        self.engine = engine
        self.run = run
        self.max_size = max_size
        self.max_delay = max_delay
        self._open: dict[tuple, _Batch] = {}

    async def evaluate(self, name: str, x: torch.Tensor) -> Outcome:
        key = (name, tuple(x.shape[1:]), x.dtype, x.device)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(name)
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(self.max_delay, self._close, key)
        waiter = asyncio.get_running_loop().create_future()
        batch.inputs.append(x)
        batch.waiters.append(waiter)
        if len(batch.inputs) >= self.max_size:
            self._close(key)
        return await waiter

    def _close(self, key: tuple) -> None:
        batch = self._open.pop(key, None)
        if batch is None:
            return
        batch.timer.cancel()
        asyncio.get_running_loop().create_task(self._answer(batch))

    async def _answer(self, batch: _Batch) -> None:
        try:
            if len(batch.inputs) == 1:  # nothing to merge: the plain path, no concatenation
                outcome = await self.run(batch.inputs[0].numel(), self.engine.normalize,
                                         batch.name, batch.inputs[0], "eval")
                outcomes = [outcome]
            else:
                elements = sum(x.numel() for x in batch.inputs)
                outcomes = await self.run(elements, self.engine.evaluate_many, batch.name,
                                          batch.inputs)
        except Exception as exc:  # every request of the batch gets the same answer
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, outcome in zip(batch.waiters, outcomes, strict=True):
            if not waiter.done():
                waiter.set_result(outcome)
