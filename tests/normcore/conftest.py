"""The parity suites run twice: once through the fused kernels, once on the torch path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normcore import kernels


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
