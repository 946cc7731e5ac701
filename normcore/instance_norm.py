"""InstanceNorm1d/2d/3d: normalize each (sample, channel) over its spatial dims.

As in torch.nn, running statistics are off by default, ``num_batches_tracked`` is kept in
the state dict but never counted, and ``momentum=None`` leaves the running statistics as
they are. Unbatched inputs (no N dim) are accepted.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import functional as F
from ._base import _NormBase, check_floating
from ._running import run_instance_norm
from .errors import InputError


class _InstanceNorm(_NormBase):
    _spatial: int  # number of spatial dims

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def _check_input(self, input: Tensor) -> None:
        if not input.is_floating_point():
            check_floating(input)  # raises
        unbatched = self._spatial + 1
        if input.dim() not in (unbatched, unbatched + 1):
            raise InputError(
                f"expected {unbatched}D or {unbatched + 1}D input (got {input.dim()}D input)"
            )
        channel_dim = input.dim() - unbatched
        if self.affine or self.track_running_stats:
            self._check_channels(input, channel_dim)
        elif input.size(channel_dim) != self.num_features:
            warnings.warn(
                f"input's size at dim={channel_dim} does not match num_features; "
                "num_features is not used because affine=False",
                stacklevel=3,
            )

    def _run(self, input: Tensor, training: bool, *, with_stats: bool) -> F.Normalized | Tensor:
        self._check_input(input)
        unbatched = input.dim() == self._spatial + 1
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = training or not self.track_running_stats
        if training and self.track_running_stats and x.numel() == 0:  # NaN or nothing learned
            raise InputError("a train step needs a non-empty batch")
        if with_stats and x.size(0) == 0:
            # No instances, no statistics. (torch.nn's affine InstanceNorm fails on an empty
            # batch with an IndexError; forward follows it, normalize answers.)
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            stats = x.new_empty((0, x.size(1)), dtype=dtype)
            return F.Normalized(torch.empty_like(x), stats, stats.clone())
        weight, bias, running_mean, running_var = self._tensors()
        result = run_instance_norm(
            x, running_mean, running_var, weight, bias, use_input_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps,
            with_stats=with_stats, reject_non_finite=self.reject_non_finite and training,
        )
        if not unbatched:
            return result
        if with_stats:
            return F.Normalized(*(t.squeeze(0) for t in result))
        return result.squeeze(0)

    def normalize(self, input: Tensor, train: bool | None = None) -> F.Normalized:
        """Normalize ``input``; also return its per-instance statistics, shape ``[N, C]``.

        ``train`` overrides ``self.training`` for this call only.
        """
        return self._run(input, self.training if train is None else train, with_stats=True)

    def forward(self, input: Tensor) -> Tensor:
        return self._run(input, self.training, with_stats=False)


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over ``[N, C, L]`` (or ``[C, L]``) inputs."""

    _spatial = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over ``[N, C, H, W]`` (or ``[C, H, W]``) inputs."""

    _spatial = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization over ``[N, C, D, H, W]`` (or ``[C, D, H, W]``) inputs."""

    _spatial = 3
