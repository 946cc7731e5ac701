"""The parity suites run twice: once through the fused kernels, once on the torch path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from normcore import kernels


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # The suite's tensors are tiny: threads add nothing to them, and on a machine busier
    # than its cores every parallel region in torch can stall for a scheduler time slice.
    # Tests of the parallel paths set their own thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
