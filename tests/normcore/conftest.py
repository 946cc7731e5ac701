"""The parity suites run twice: once through the fused kernels, once on the torch path.
The kernel suites get a spy on the extension module, two threads, and streamed outputs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normcore import kernels
from normcore.kernels import _loader

from .checks import Spy, torch_threads


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # The suite's tensors are tiny: threads add nothing to them, and on a machine busier
    # than its cores every parallel region in torch can stall for a scheduler time slice.
    # Tests of the parallel paths set their own thread counts.
    with torch_threads(1):
        yield


@pytest.fixture(params=["kernels", "torch"])
def both_paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test once with ``normcore.kernels`` on and once with them switched off."""
    on = request.param == "kernels"
    if on and not kernels.warm_up():
        pytest.skip("the kernels are not available here (test_kernels.py says why)")
    previous = kernels.set_enabled(on)
    try:
        yield request.param
    finally:
        kernels.set_enabled(previous)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    """The kernels switched on, every call into them counted."""
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    previous = kernels.set_enabled(True)
    watcher = Spy(_loader.ops())
    monkeypatch.setattr(_loader._state, "module", watcher)
    monkeypatch.setattr(_loader._state, "active", watcher)
    yield watcher
    kernels.set_enabled(previous)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The kernels' parallel paths: the suite otherwise runs on one thread."""
    with torch_threads(2):
        yield


@pytest.fixture(params=["cached", "streamed"])
def output_stores(request: pytest.FixtureRequest) -> Iterator[str]:
    """Outputs under the streaming threshold (one fused pass), and over it (two passes)."""
    if request.param == "cached":
        yield request.param
        return
    module = _loader.ops()
    previous = module.stream_threshold(0)  # every output is streamed
    try:
        yield request.param
    finally:
        module.stream_threshold(previous)
