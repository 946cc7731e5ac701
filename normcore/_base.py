"""_NormBase: the arguments, parameters and running buffers shared by BatchNorm and
InstanceNorm, with torch.nn's names, so state dicts move freely between the two.

Momentum, once for all layers: in a train step that tracks running statistics,

    running = (1 - momentum) * running + momentum * batch_statistic

and ``momentum=None`` makes it the cumulative average: the step's factor is
``1 / num_batches_tracked`` after counting the step, so the running statistics are the
plain mean of every batch statistic seen. ``running_var`` receives the unbiased variance
(``m / (m - 1)`` times the biased one that normalized the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import InputError


def _tensors(module: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None,
                                         Tensor | None]:
    # nn.Module.__getattr__ runs only after a failed attribute lookup, about a microsecond
    # per parameter or buffer, which is most of the time a small input takes; it reads
    # these same dicts.
    params, buffers = module._parameters, module._buffers
    return (params.get("weight"), params.get("bias"), buffers.get("running_mean"),
            buffers.get("running_var"))


def register_affine(
    module: nn.Module, shape: int | tuple[int, ...], *, weight: bool, bias: bool | None,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> None:
    """Register torch's ``weight`` and ``bias`` parameters of ``shape``, or None in place of
    those not wanted; ``bias=None`` registers no bias at all (RMSNorm has none).

    Their values are set by ``reset_affine``.
    """

    def parameter(wanted: bool) -> nn.Parameter | None:
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if wanted else None

    module.register_parameter("weight", parameter(weight))
    if bias is not None:
        module.register_parameter("bias", parameter(bias))


def reset_affine(module: nn.Module) -> None:
    """Weight 1 and bias 0, for those the module has."""
    weight, bias, _, _ = _tensors(module)
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


def check_floating(input: Tensor) -> None:
    """Reject integer, bool and complex tensors with a clear message."""
    if not input.is_floating_point():
        raise InputError(f"expected a floating-point tensor, got {input.dtype}")


class _NormBase(nn.Module):
    """Common state of BatchNorm* and InstanceNorm*."""

    _version = 2
    # A train step whose statistics are NaN/Inf raises NonFiniteError instead of
    # poisoning the running statistics; set to False on a layer to follow torch instead.
    reject_non_finite: bool = True

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, weight=affine, bias=affine, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight to 1 and bias to 0."""
        self.reset_running_stats()
        reset_affine(self)

    def _tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(weight, bias, running_mean, running_var), read without ``Module.__getattr__``."""
        return _tensors(self)

    def _check_channels(self, input: Tensor, dim: int) -> None:
        if input.size(dim) != self.num_features:
            raise InputError(
                f"expected {self.num_features} channels at dim {dim}, "
                f"got {input.size(dim)} (input shape {list(input.shape)})"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # Checkpoints from before num_batches_tracked existed (and safetensors files, which
        # carry no module version) may lack it: start its count at zero, as torch does.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
