"""GroupNorm: normalize each sample over groups of channels and all spatial dims."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import _tensors, check_floating, register_affine, reset_affine
from .errors import InputError


class GroupNorm(nn.Module):
    """Statistics per (sample, group) of ``num_channels / num_groups`` channels."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError("num_channels must be divisible by num_groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        register_affine(self, num_channels, weight=affine, bias=affine, device=device,
                        dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def _check_input(self, input: Tensor) -> None:
        if not input.is_floating_point():
            check_floating(input)  # raises
        shape = input.shape
        if len(shape) < 2 or shape[1] != self.num_channels:
            raise InputError(
                f"expected input of shape [N, {self.num_channels}, *], "
                f"got {list(input.shape)}"
            )

    def normalize(self, input: Tensor, train: bool | None = None) -> F.Normalized:
        """Normalize ``input``; also return its per-group statistics, shape ``[N, G]``.

        ``train`` is accepted for a uniform interface: there are no running statistics.
        """
        self._check_input(input)
        weight, bias, _, _ = _tensors(self)
        return F.group_norm_with_stats(input, self.num_groups, weight, bias, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        weight, bias, _, _ = _tensors(self)
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
