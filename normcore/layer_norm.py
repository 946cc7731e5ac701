"""LayerNorm and RMSNorm: normalize each sample over its last ``len(normalized_shape)`` dims.

Neither keeps running statistics; train and eval mode compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import _tensors, check_floating, register_affine, reset_affine
from .errors import InputError


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


class _LastDimsNorm(nn.Module):
    normalized_shape: tuple[int, ...]

    def reset_parameters(self) -> None:
        """Weight 1 and bias 0 (RMSNorm has no bias)."""
        reset_affine(self)

    def _check_input(self, input: Tensor) -> None:
        if not input.is_floating_point():
            check_floating(input)  # raises
        # Shorter inputs give a shorter slice, which differs as well.
        k = len(self.normalized_shape)
        if input.shape[input.dim() - k :] != self.normalized_shape:
            raise InputError(
                f"expected input whose last {k} dims are {list(self.normalized_shape)}, "
                f"got shape {list(input.shape)}"
            )


class LayerNorm(_LastDimsNorm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last dims."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(self, self.normalized_shape, weight=elementwise_affine,
                        bias=elementwise_affine and bias, device=device, dtype=dtype)
        self.reset_parameters()

    def normalize(self, input: Tensor, train: bool | None = None) -> F.Normalized:
        """Normalize ``input``; also return mean and biased variance of each sample.

        ``train`` is accepted for a uniform interface: there are no running statistics.
        """
        self._check_input(input)
        weight, bias, _, _ = _tensors(self)
        return F.layer_norm_with_stats(input, self.normalized_shape, weight, bias, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        weight, bias, _, _ = _tensors(self)
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )


class RMSNorm(_LastDimsNorm):
    """y = x / sqrt(mean(x^2) + eps) * weight; ``eps=None`` is the dtype's machine epsilon."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(self, self.normalized_shape, weight=elementwise_affine, bias=None,
                        device=device, dtype=dtype)
        self.reset_parameters()

    def normalize(self, input: Tensor, train: bool | None = None) -> F.RMSNormalized:
        """Normalize ``input``; also return the mean square of each sample.

        ``train`` is accepted for a uniform interface: there are no running statistics.
        """
        self._check_input(input)
        weight, _, _, _ = _tensors(self)
        return F.rms_norm_with_stats(input, self.normalized_shape, weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        weight, _, _, _ = _tensors(self)
        return F.rms_norm(input, self.normalized_shape, weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )
