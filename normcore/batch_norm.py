"""BatchNorm1d/2d/3d: normalize each channel (dim 1) over the batch and spatial dims."""

from __future__ import annotations

from torch import Tensor

from . import functional as F
from ._base import _NormBase, check_floating
from ._running import run_batch_norm
from .errors import InputError


class _BatchNorm(_NormBase):
    _ranks: tuple[int, ...]

    def _check_input(self, input: Tensor) -> None:
        if not input.is_floating_point():
            check_floating(input)  # raises
        if input.dim() not in self._ranks:
            wanted = " or ".join(f"{r}D" for r in self._ranks)
            raise InputError(f"expected {wanted} input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            self._check_channels(input, 1)  # raises

    def _step(self, training: bool, running_mean: Tensor | None) -> tuple[bool, bool, float]:
        """(normalize with batch statistics?, update running statistics?, momentum)."""
        use_batch_stats = training or running_mean is None
        update = training and self.track_running_stats
        if not update:
            return use_batch_stats, False, 0.0
        if self.momentum is None:  # cumulative average, counting this step
            tracked = self._buffers["num_batches_tracked"]
            return use_batch_stats, True, 1.0 / float(tracked.item() + 1)
        return use_batch_stats, True, self.momentum

    def normalize(self, input: Tensor, train: bool | None = None) -> F.Normalized:
        """Normalize ``input`` and return it with its batch statistics (shape ``[C]``).

        In train mode those statistics normalized the input and are folded into the
        running statistics; in eval mode the running statistics normalize and the batch
        statistics are returned for monitoring. ``train`` overrides ``self.training`` for
        this call only, so a shared layer never has to be switched between modes.
        """
        training = self.training if train is None else train
        return self._run(input, training, self._tensors(), with_stats=True)

    def forward(self, input: Tensor) -> Tensor:
        tensors = self._tensors()
        weight, bias, running_mean, running_var = tensors
        if self.training or running_mean is None:  # batch statistics
            return self._run(input, self.training, tensors, with_stats=False)
        self._check_input(input)  # eval: one fused scale-and-shift, no statistics pass
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, False, 0.0, self.eps
        )

    def _run(self, input: Tensor, training: bool, tensors: tuple[Tensor | None, ...], *,
             with_stats: bool) -> F.Normalized | Tensor:
        self._check_input(input)
        weight, bias, running_mean, running_var = tensors
        use_batch_stats, update, momentum = self._step(training, running_mean)
        if update and input.numel() == 0:  # torch.nn counts a batch it learns nothing from
            raise InputError("a train step needs a non-empty batch")
        running = update or not use_batch_stats
        return run_batch_norm(
            input,
            running_mean if running else None,
            running_var if running else None,
            weight, bias, use_batch_stats, momentum, self.eps,
            reject_non_finite=self.reject_non_finite, with_stats=with_stats,
            num_batches_tracked=self._buffers["num_batches_tracked"] if update else None,
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalization over ``[N, C]`` or ``[N, C, L]`` inputs."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over ``[N, C, H, W]`` inputs."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over ``[N, C, D, H, W]`` inputs."""

    _ranks = (5,)
