"""Request-scoped helpers shared by the routers: the engine, the body, the token."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..core.auth import check_bearer
from ..core.engine import Engine, Outcome
from ..core.errors import (
    NAME_PATTERN,
    BodyTooLargeError,
    KeyInFlightError,
    RequestTimeoutError,
)
from ..settings import Settings
from ..wire import compression
from ..wire.tensors import Limits, work_elements

# Tensors up to this many elements (counting what their statistics span, see
# wire.tensors.work_elements) are normalized on the event loop: the hop to a worker thread
# costs more than the work. So are small train steps that can start at once with state in
# memory (see normalize_tensor). Larger tensors, and train steps that may wait for a layer
# or the journal, run in the thread pool so the loop keeps serving.
INLINE_ELEMENTS = 16384
# Bodies and replies over this many bytes (or elements) are parsed and built off the loop.
OFF_LOOP_SIZE = 256 * 1024


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def read_body(request: Request) -> bytearray:
    """The whole body in one writable buffer (so tensors can view it without a copy),
    refused with 413 as soon as it passes the size limit, chunked or not, and decompressed
    as its Content-Encoding says (within the same limit)."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(limit)
    encoding = request.headers.get("content-encoding")
    if encoding:
        body = await run_in_threadpool(compression.decompress, body, encoding, limit)
    return body


def _check_token(request: Request) -> None:
    token = request.app.state.settings.api_token
    if token is not None:
        check_bearer(token.get_secret_value(), request.headers.get("authorization"))


def authorize_write(request: Request) -> None:
    """Every state-changing operation needs the token when one is configured."""
    _check_token(request)


def authorize_read(request: Request) -> None:
    """Reads need the token only when the service is told to protect them."""
    if request.app.state.settings.protect_reads:
        _check_token(request)


def authorize_early(request: Request) -> None:
    """What can be told before a body is read, whose mode decides the access it needs: a
    token that is sent must be right, and with reads protected one must be sent."""
    settings = request.app.state.settings
    if settings.api_token is None:
        return
    if settings.protect_reads or "authorization" in request.headers:
        _check_token(request)


@contextlib.asynccontextmanager
async def one_big_json_at_a_time(request: Request, size: int) -> AsyncIterator[None]:
    """Around the parse of a JSON body of ``size`` bytes and the building of its tensor:
    big ones go one at a time. Each holds the GIL for most of its work, so the event loop
    waits on it whichever thread runs it, and its Python objects take about 25 times its
    size: at once, four stalled every request for three quarters of a second and took
    1.6 GB, one after the other they stall no longer than one. One waits for its turn at
    most ``request_timeout`` (then 503), and is dropped if its client left meanwhile."""
    if size <= OFF_LOOP_SIZE:
        yield
        return
    gate = request.app.state.json_gate
    try:  # a request that cannot start in time is refused, as the engine refuses one
        async with asyncio.timeout(request.app.state.settings.request_timeout):
            await gate.acquire()
    except TimeoutError:
        raise RequestTimeoutError from None
    try:
        if await request.is_disconnected():  # queued, then gone: nobody wants the work
            raise ClientDisconnect
        yield
    finally:
        gate.release()


async def off_loop(size: int, fn, *args):
    """``fn(*args)`` on the event loop when ``size`` (bytes or elements) is small, else in
    the thread pool: parsing or building a big body would stall every other request."""
    if size <= OFF_LOOP_SIZE:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def authorize_mode(request: Request, mode: str) -> None:
    """Train changes state and needs write access; anything else needs read access."""
    if mode == "train":
        authorize_write(request)
    else:
        authorize_read(request)


async def run_step(elements: int, train: bool, fn, *args):
    """Run an engine call inline for small eval tensors, else in the thread pool.

    A started call is never abandoned: it finishes and is answered. The request timeout is
    a deadline the engine checks before a step starts (``normalize_tensor``), so a request
    that waited too long is refused with nothing applied, and no thread outlives its reply.
    """
    if not train and elements <= INLINE_ELEMENTS:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def normalize_tensor(request: Request, name: str, x, mode: str,
                           request_id: str | None = None) -> Outcome:
    """The engine's normalize for a route: merged with concurrent eval requests when
    dynamic batching is on, else inline or in the thread pool (``run_step``)."""
    state = request.app.state
    if mode == "eval" and state.batcher is not None and state.engine.can_batch(name, x):
        return await state.batcher.evaluate(name, x)
    engine, elements = state.engine, work_elements(x.shape)
    if mode == "train" and elements <= INLINE_ELEMENTS:
        try:
            # Taken on the loop when the step can start at once (a deadline of now: the
            # layer is free); the hop to a thread costs more than the step. With a change
            # log the reply then waits for the group commit without holding a thread.
            step = engine.start_train(name, x, request_id, time.monotonic())
        except (RequestTimeoutError, KeyInFlightError):
            pass  # busy, and nothing was applied: wait for it in a worker thread
        else:
            return step.result() if step.done() else await _settled(step)
    deadline = time.monotonic() + state.settings.request_timeout
    return await run_step(elements, mode == "train", engine.normalize, name, x, mode,
                          request_id, deadline)


async def _settled(step: Future) -> Outcome:
    """The outcome of a step under way. A durable step settles on this loop (the journal
    settles a group there), so its outcome is handed over directly, one future and no
    extra loop turn; ``asyncio.wrap_future`` would always go through call_soon_threadsafe.
    A request cancelled meanwhile does not cancel the step: it finishes and is made safe."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    waiting = loop.create_future()

    def hand_over(done: Future) -> None:
        if threading.get_ident() == loop_thread:
            _copy_outcome(done, waiting)
        else:
            loop.call_soon_threadsafe(_copy_outcome, done, waiting)

    step.add_done_callback(hand_over)
    return await waiting


def _copy_outcome(done: Future, waiting: asyncio.Future) -> None:
    if waiting.cancelled():
        return
    if done.cancelled():
        waiting.cancel()
        return
    error = done.exception()
    if error is None:
        waiting.set_result(done.result())
    else:
        waiting.set_exception(error)


EngineDep = Annotated[Engine, Depends(get_engine)]
# A layer name in a path; others are refused (422) before the route runs. ("$" is the
# end of the text for pydantic and JSON Schema, unlike Python's re: no trailing newline.)
LayerName = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$",
                                description="A layer name: 1 to 128 of A-Z a-z 0-9 . _ -")]
WriteAccess = Depends(authorize_write)
ReadAccess = Depends(authorize_read)
