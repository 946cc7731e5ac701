"""Exceptions raised by normcore.

    NormcoreError            base of everything normcore raises on purpose
    ├── InputError           a tensor a layer cannot take (also a ValueError and a
    │   │                    RuntimeError: torch.nn raises either, by the mistake)
    │   └── NonFiniteError   NaN/Inf statistics in a train step that would update running stats
    └── CheckpointError      a checkpoint that is missing, unsafe, corrupt or inconsistent

Errors say what is wrong in words; they carry no transport (HTTP) codes.
"""

from __future__ import annotations


class NormcoreError(Exception):
    """Base class of the errors normcore raises deliberately."""


class InputError(NormcoreError, ValueError, RuntimeError):
    """The input tensor does not fit the layer (rank, channels, dtype, batch size).

    torch.nn raises ValueError for some of these (one value per channel) and RuntimeError
    for others (a channel count or shape that does not fit): code written for either
    catches this one."""


class NonFiniteError(InputError):
    """A train step would fold NaN or Inf into the running statistics."""


class CheckpointError(NormcoreError):
    """A checkpoint file or state dict cannot be used; the message names file and reason."""
