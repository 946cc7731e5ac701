"""BatchNorm and InstanceNorm: the families that keep running statistics.

``run_batch_norm`` and ``run_instance_norm`` are what the layers call: the public functions
plus the options a layer needs (statistics returned, NaN/Inf refused, the batch counted).

Empty inputs (and inputs without a channel dim) get torch's own answer, which differs
between the two: BatchNorm leaves the running statistics alone, InstanceNorm over a batch
of no samples sets them to NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._stats import (
    REDUCED,
    Normalized,
    check_finite,
    check_per_channel,
    check_writable,
    fold_running,
    raise_non_finite,
    stat_dtype,
    var_mean,
    verify_batch_size,
    verify_eps,
    verify_spatial_size,
)
from .kernels import cpu as _fast

__all__ = [
    "batch_norm",
    "batch_norm_stats",
    "batch_norm_with_stats",
    "instance_norm",
    "instance_norm_with_stats",
    "run_batch_norm",
    "run_instance_norm",
]


def _with_nan_stats(output: Tensor, input: Tensor, dims: Sequence[int], with_stats: bool
                    ) -> Normalized | Tensor:
    """``output``, with the statistics over ``dims`` of an input with no values (NaN)."""
    if not with_stats:
        return output
    var, mean = var_mean(input, dims)
    return Normalized(output, mean, var)


# --- batch norm ---------------------------------------------------------------------------


def run_batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float, eps: float,
    *, reject_non_finite: bool = False, with_stats: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Normalized | Tensor:
    """The output, with the batch statistics if ``with_stats``.

    A training step that updates the running statistics also adds one to
    ``num_batches_tracked`` if it is given.
    """
    if training:
        verify_batch_size(input.size())
    verify_eps(eps, training)
    # The kernels decline every input that the checks below would refuse.
    fast = _fast.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        reject_non_finite, with_stats, num_batches_tracked,
    )
    if fast is not None:  # running statistics already updated, unless rejected
        output, mean, var, rejected = fast
        if rejected:
            raise_non_finite()
        return Normalized(output, mean, var) if with_stats else output
    if input.numel() == 0 or input.dim() < 2:
        return _empty_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, with_stats
        )
    channels = input.size(1)
    check_per_channel(channels, running_mean, running_var, weight, bias)
    if training:
        check_writable(running_mean, running_var, num_batches_tracked)
    if not training and running_mean is not None and running_var is not None:
        dtype = stat_dtype(input, weight)
        output = torch.batch_norm(
            input, weight, bias, running_mean.to(dtype), running_var.to(dtype), False, 0.0,
            eps, torch.backends.cudnn.enabled,
        )
        return Normalized(output, *batch_norm_stats(input)) if with_stats else output
    if training and not with_stats and _plain_buffers(running_mean, running_var):
        output = _train_in_place(torch.batch_norm, input, running_mean, running_var, weight,
                                 bias, momentum, eps, reject_non_finite)
        if output is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return output
    output, stats, count = _train_pass(input, weight, bias, eps)
    if training and running_mean is not None and running_var is not None:
        if reject_non_finite:
            check_finite(stats)
        fold_running(running_mean, running_var, stats, momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return Normalized(output, stats[0], _biased(stats[1], count)) if with_stats else output


def _train_pass(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, int]:
    """torch's own train-mode batch norm over dim 1, in one fused pass: (output, stats,
    count), ``stats`` a [2, C] tensor of the mean and the unbiased variance over the
    ``count`` values per channel (the biased variance when ``count`` < 2).

    The batch's statistics come out through running buffers that start at zero and take
    momentum 1, so they are torch's own to the last bit. Much faster than a separate
    ``var_mean`` for float16/bfloat16 and float64 input, whose CPU reductions over dims
    0, 2, ... are scalar loops; and one [2, C] tensor is one allocation and one finiteness
    check.
    """
    dtype = stat_dtype(input, weight)
    count = input.numel() // input.size(1)
    if count < 2:  # no unbiased variance: reduce, then normalize
        var, mean = var_mean(input, [0, *range(2, input.dim())])
        output = torch.batch_norm(input, weight, bias, mean.to(dtype), var.to(dtype), False,
                                  0.0, eps, torch.backends.cudnn.enabled)
        return output, torch.stack((mean, var)), count
    stats = torch.zeros(2, input.size(1), dtype=dtype, device=input.device)
    output = torch.native_batch_norm(input, weight, bias, *stats.unbind(), True, 1.0, eps)[0]
    return output, stats, count


def _train_in_place(norm: Callable[..., Tensor], input: Tensor, running_mean: Tensor,
                    running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                    momentum: float, eps: float, reject_non_finite: bool) -> Tensor | None:
    """torch.nn's own train step (``norm``: torch.batch_norm or torch.instance_norm), the
    running statistics updated inside torch's call; None (and the statistics as they were)
    when the result is not finite.

    A forward that returns no statistics needs no [2, C] buffer and no separate fold: one
    call, as torch.nn makes it. A non-finite batch statistic always leaves a non-finite
    running one (momentum times NaN or Inf), so checking the result and restoring a copy
    taken first refuses what the batch-statistics check would; the caller then takes that
    exact path, which also decides the rare case of running statistics that were not
    finite before this step.
    """
    saved = torch.cat((running_mean, running_var)) if reject_non_finite else None
    output = norm(input, weight, bias, running_mean, running_var, True, momentum, eps,
                  input.is_cuda and torch.backends.cudnn.enabled)
    # One reduction checks both: a NaN or Inf in either makes their dot product NaN or Inf
    # (0 * Inf is NaN); a dot of finite values that overflows only sends the step down the
    # exact path.
    if saved is None or math.isfinite(float(running_mean.dot(running_var))):
        return output
    channels = running_mean.numel()
    running_mean.copy_(saved[:channels])
    running_var.copy_(saved[channels:])
    return None


def _plain_buffers(running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    """Both running statistics given, as a layer holds them: vectors of one dtype."""
    return (running_mean is not None and running_var is not None
            and running_mean.dim() == running_var.dim() == 1
            and running_mean.dtype == running_var.dtype)


def _biased(var: Tensor, count: int) -> Tensor:
    """The biased variance of ``count`` values from ``_train_pass``'s variance."""
    return var if count < 2 else var * ((count - 1) / count)


def _empty_batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float, eps: float,
    with_stats: bool,
) -> Normalized | Tensor:
    """torch's own answer for an empty input (or its error for one without a channel dim)."""
    # NOTE: on an empty input torch checks no sizes and leaves the running statistics alone.
    output = torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps,
        torch.backends.cudnn.enabled,
    )
    return _with_nan_stats(output, input, [0, *range(2, input.dim())], with_stats)


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, var)`` of ``input`` (biased var, over every dim but 1), as a
    train-mode ``batch_norm`` computes them; float32 for float16/bfloat16 input."""
    if input.numel() == 0:
        var, mean = var_mean(input, [0, *range(2, input.dim())])
        return mean, var
    fast = _fast.batch_norm_stats(input)
    if fast is not None:
        return fast
    _, stats, count = _train_pass(input, None, None, 0.0)
    return stats[0], _biased(stats[1], count)


def batch_norm_with_stats(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Normalized:
    """``batch_norm`` that also returns the batch statistics, each of shape ``[C]``."""
    if not training and (running_mean is None or running_var is None):
        # Same error as torch: eval mode needs running statistics.
        torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps, False)
    return run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel (dim 1).

    In training, mean/var are the batch's (over every dim but 1) and the running
    statistics are updated; otherwise the running statistics normalize.
    """
    if not training:
        verify_eps(eps, training)
        fast = _fast.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
        if fast is not None:
            return fast
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, False, momentum, eps,
            torch.backends.cudnn.enabled,
        )
    return run_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        with_stats=False,
    )


# --- instance norm ------------------------------------------------------------------------


def run_instance_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, use_input_stats: bool, momentum: float,
    eps: float, *, with_stats: bool, reject_non_finite: bool = False,
) -> Normalized | Tensor:
    """The output, with the per-instance statistics (``[N, C]``) if ``with_stats``."""
    if use_input_stats:
        # The kernels decline every input that the checks below would refuse.
        fast = _fast.instance_norm(
            input, running_mean, running_var, weight, bias, momentum, eps, reject_non_finite,
            with_stats,
        )
        if fast is not None:  # running statistics already updated, unless rejected
            output, mean, var, rejected = fast
            if rejected:
                raise_non_finite()
            return Normalized(output, mean, var) if with_stats else output
        verify_spatial_size(input.size())
    if input.numel() == 0 or input.dim() < 2:
        return _empty_instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
            with_stats=with_stats, reject_non_finite=reject_non_finite,
        )
    channels = input.size(1)
    check_per_channel(channels, running_mean, running_var, weight, bias)
    if use_input_stats:
        check_writable(running_mean, running_var)
    # Not for a float16/bfloat16 input without a float32 weight: torch.instance_norm then
    # computes its statistics at the input's precision (an error of 2e-3 on a running mean
    # of 5 in float16, 2e-2 in bfloat16); normcore's accumulate in float32. With one, torch
    # takes its mixed-precision path, float32 throughout.
    mixed = weight is not None and weight.dtype == torch.float32
    if (use_input_stats and not with_stats and (input.dtype not in REDUCED or mixed)
            and _plain_buffers(running_mean, running_var)):
        output = _train_in_place(torch.instance_norm, input, running_mean, running_var, weight,
                                 bias, momentum, eps, reject_non_finite)
        if output is not None:
            return output
    if not use_input_stats and not with_stats:
        return _instance_norm_eval(input, running_mean, running_var, weight, bias, momentum, eps)
    update = use_input_stats and running_mean is not None and running_var is not None
    if use_input_stats:
        # Each (sample, channel) pair is one channel of a batch norm over a batch of one.
        batch = input.size(0)
        flat = input.reshape(1, batch * channels, *input.shape[2:])
        output, stats, count = _train_pass(
            flat, None if weight is None else weight.repeat(batch),
            None if bias is None else bias.repeat(batch), eps)
        output, stats = output.view_as(input), stats.view(2, batch, channels)
        if update and reject_non_finite:
            check_finite(stats)
        if update:
            # torch updates one copy of the running stats per sample and keeps their average.
            averaged = stats.mean(1)
            fold_running(running_mean, running_var, averaged, momentum)
        if not with_stats:
            return output
        return Normalized(output, stats[0], _biased(stats[1], count))
    fast = _fast.instance_norm_eval(input, running_mean, running_var, weight, bias, eps)
    if fast is not None:  # the statistics from the read that normalizes
        return Normalized(*fast)
    mean, var = _instance_stats(input, eps)
    output = _instance_norm_eval(input, running_mean, running_var, weight, bias, momentum, eps)
    return Normalized(output, mean, var)


def _instance_stats(input: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, var) of each (sample, channel), ``[N, C]`` each, in eval mode."""
    # The kernels' GroupNorm statistics serve, one channel a group.
    fast = _fast.group_norm(input, input.size(1), None, None, eps, output=False)
    if fast is not None:
        return fast[1], fast[2]
    var, mean = var_mean(input, range(2, input.dim()))
    return mean, var


def _empty_instance_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, use_input_stats: bool, momentum: float,
    eps: float, *, with_stats: bool, reject_non_finite: bool,
) -> Normalized | Tensor:
    """torch's own answer for an empty input (or its error for one without a channel dim)."""
    # NOTE: with input statistics torch sets the running statistics to the average of one
    # updated copy per sample: NaN when there is none, which a layer may refuse.
    tracked = running_mean is not None or running_var is not None
    if reject_non_finite and use_input_stats and tracked and input.size(0) == 0:
        raise_non_finite()
    output = torch.instance_norm(
        input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
        torch.backends.cudnn.enabled,
    )
    return _with_nan_stats(output, input, range(2, input.dim()), with_stats)


def _instance_norm_eval(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    fast = _fast.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    if fast is not None:
        return fast
    return torch.instance_norm(
        input, weight, bias, running_mean, running_var, False, momentum, eps,
        torch.backends.cudnn.enabled,
    )


def instance_norm(
    input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """Normalize each (sample, channel) over its spatial dims (dims 2 and up)."""
    return run_instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
        with_stats=False,
    )


def instance_norm_with_stats(
    input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Normalized:
    """``instance_norm`` that also returns the per-instance statistics, shape ``[N, C]``."""
    return run_instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
        with_stats=True,
    )
