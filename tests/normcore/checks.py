"""What the kernel suites share: a spy on the extension module, and the train-train-eval
comparison against torch.nn."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

from .cases import FLOAT32, Precision


class Spy:
    """Counts the calls that the extension module's kernels took (an entry point answers
    NotImplemented to an input it declines: not counted)."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str):
        fn = getattr(self._module, name)

        def call(*args):
            result = fn(*args)
            if result is not NotImplemented:
                self.calls[name] += 1
            return result

        return call


def assert_same(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor,
                precision: Precision = FLOAT32) -> None:
    """Two train steps then eval, outputs and every buffer as torch.nn's."""
    with torch.no_grad():
        for mode in (True, True, False):
            ours.train(mode)
            ref.train(mode)
            precision.assert_close(ours(x), ref(x))
            precision.assert_same_state(ours, ref)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's (and so the kernels') thread count set to ``count`` for a while."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
