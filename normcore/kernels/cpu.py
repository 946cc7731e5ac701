"""Calls into the fused C++ kernels, for the inputs they take; ``None`` for all others.

They take C-contiguous float32, float16, bfloat16 and float64 CPU tensors (BatchNorm:
channels_last too) with contiguous parameters and running statistics in the dtype torch
computes in, that of the statistics returned too: float32 under float32 and half inputs
(as torch.nn runs a half input through a float32 layer), float64 under float64. Only when
no gradient is wanted and nothing is traced; all else (other dtypes, mixes and devices,
strided views, lazily negated views, empty tensors, the kernels off or not built) gets
``None``: torch's path.

The kernels check the tensors and allocate the outputs themselves, in C++
(``csrc/tensors.cpp``), and answer NotImplemented to an input they do not take. On a few
megabytes, the same checks in Python cost as much as the kernel spends beyond a copy: the
input has evicted the interpreter from the caches by then.

Each function declines every input that one of functional's checks would refuse (sizes of
per-channel tensors, one value per channel in training, shapes torch rejects), so
functional may ask here first and run its checks only on the torch path: a call taken
here has passed them all, and the kernels write no running statistic unless it has.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._loader import ops

_threads = torch.get_num_threads


def batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float, eps: float,
    reject_non_finite: bool, with_stats: bool, num_batches_tracked: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, bool] | None:
    """(output, batch mean, batch var, rejected) as ``normcore._running.run_batch_norm``.

    A training step updates the running statistics (when both are given) and adds one to
    ``num_batches_tracked`` (when given). With ``reject_non_finite``, a NaN or Inf batch
    statistic leaves all three untouched and ``rejected`` is True. Batch statistics are
    returned if ``with_stats``, or always in eval mode with running statistics (then they
    are computed for the caller, in the same read of the input as the output).
    """
    kernels = ops()
    if kernels is None:
        return None
    if training or running_mean is None or running_var is None:
        # Outside training at most one running statistic is given here: the kernels check
        # its size and leave it be (they move only a pair of them).
        done = kernels.batch_norm_train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
            eps, reject_non_finite, True, with_stats, _threads(),
        )
        if done is NotImplemented:
            return None
        output, mean, var, ok = done
        return output, mean, var, not ok
    done = kernels.batch_norm_eval_stats(input, weight, bias, running_mean, running_var, eps,
                                         _threads())
    return None if done is NotImplemented else (*done, False)


def batch_norm_eval(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor | None:
    """y = x * scale + shift per channel, the running statistics folded into both."""
    kernels = ops()
    if kernels is None:
        return None
    output = kernels.batch_norm_eval(input, weight, bias, running_mean, running_var, eps,
                                     _threads())
    return None if output is NotImplemented else output


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-channel (mean, biased var) of [N, C, *], as a BatchNorm train step computes them,
    without an output."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.batch_norm_train(input, None, None, None, None, None, 0.0, 0.0, False,
                                    False, True, _threads())
    return None if done is NotImplemented else (done[1], done[2])


def instance_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
    reject_non_finite: bool, with_stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, bool] | None:
    """(output, mean, var, rejected), input statistics [N, C], as ``run_instance_norm`` in
    training: the running statistics (when both given) move towards the batch average of
    the per-instance statistics, unless ``reject_non_finite`` finds one NaN or Inf."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.instance_norm_train(input, weight, bias, running_mean, running_var,
                                       momentum, eps, reject_non_finite, with_stats, _threads())
    if done is NotImplemented:
        return None
    output, mean, var, ok = done
    return output, mean, var, not ok


def instance_norm_eval(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(``batch_norm_eval``'s output, mean, var): InstanceNorm in eval mode with the
    statistics of each (sample, channel), [N, C], from the read that normalizes."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.instance_norm_eval_stats(input, weight, bias, running_mean, running_var,
                                            eps, _threads())
    return None if done is NotImplemented else done


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
    *, output: bool = True, stats: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """(output, mean, var), the statistics of shape [N, G]; InstanceNorm is G = C.

    ``output=False`` computes the statistics only, ``stats=False`` the output only. Declines
    one value per group (training's error), like torch's group-size check.
    """
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.group_norm(input, num_groups, weight, bias, eps, output, stats, _threads())
    return None if done is NotImplemented else done


def layer_norm(
    input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
    eps: float, *, stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """(output, mean, var), statistics of shape ``input.shape[:-len(shape)]`` if wanted."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.layer_norm(input, shape, weight, bias, eps, stats, _threads())
    return None if done is NotImplemented else done


def rms_norm(
    input: Tensor, shape: tuple[int, ...], weight: Tensor | None, eps: float | None, *,
    stats: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """(output, mean square), the latter of shape ``input.shape[:-len(shape)]`` if wanted.

    ``eps=None`` is torch's default: the machine epsilon of the statistics' dtype."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.rms_norm(input, shape, weight, eps, stats, _threads())
    return None if done is NotImplemented else done
