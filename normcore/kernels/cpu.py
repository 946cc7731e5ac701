"""Calls into the fused C++ kernels, for the inputs they take; ``None`` for all others.

They take C-contiguous float32, float16, bfloat16 and float64 CPU tensors (BatchNorm:
channels_last too) with contiguous parameters and running statistics in the dtype torch
computes in, that of the statistics returned too: float32 under float32 and half inputs
(as torch.nn runs a half input through a float32 layer), float64 under float64. Only when
no gradient is wanted and nothing is traced; all else (other dtypes, mixes and devices,
strided views, lazily negated views, empty tensors, the kernels off or not built) gets
``None``: torch's path.

BatchNorm's functions hand the tensors themselves to the kernels, which check them in C++
(``csrc/tensors.cpp``): a layer's call on a few megabytes otherwise spends as long in these
checks as the kernel spends beyond a copy (the input has evicted the interpreter from the
caches by then). The other families check here.

Each function also declines every input that one of functional's checks would refuse
(sizes of per-channel tensors, one value per channel in training, shapes torch rejects), so
functional may ask here first and run its checks only on the torch path: a call taken
here has passed them all, and the kernels write no running statistic unless it has.

The checks are written out flat: on small tensors Python's per-call overhead is what gets
measured against torch.nn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from ._loader import ops, usable

# Input dtype -> (the kernels' code for it, the dtype of its parameters and statistics).
_KINDS = {
    torch.float32: (0, torch.float32),
    torch.float16: (1, torch.float32),
    torch.bfloat16: (2, torch.float32),
    torch.float64: (3, torch.float64),
}
_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# torch.finfo(dtype).eps of each statistics dtype: RMSNorm's default epsilon.
_MACHINE_EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}
_grad_enabled = torch.is_grad_enabled
# What torch.jit.is_tracing() returns outside TorchScript, without its Python frame.
_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
_threads = torch.get_num_threads


def _wants_grad(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return _grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _vectors(n: int, dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """Each tensor None, or n contiguous values of ``dtype`` on the CPU."""
    for t in tensors:
        if t is not None and (t.dtype is not dtype or not t.is_cpu or t.numel() != n
                              or not t.is_contiguous()):
            return False
    return True


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _channels(input: Tensor) -> tuple[int, torch.dtype, int, int, int] | None:
    """(dtype code, statistics dtype, N, C, HW) of a CPU input the kernels take as
    [N, C, HW]; channels_last as [N*H*W, C, 1]; else None."""
    kind = _KINDS.get(input.dtype)
    if kind is None or not input.is_cpu or input.is_neg():
        return None
    shape = input.shape
    numel = input.numel()
    if len(shape) < 2 or numel == 0:
        return None
    n = shape[0]
    c = shape[1]
    if input.is_contiguous():
        return *kind, n, c, numel // (n * c)
    last = _LAST.get(len(shape))
    if last is not None and input.is_contiguous(memory_format=last):
        return *kind, numel // c, c, 1
    return None


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

    BatchNorm's kernels check their tensors and allocate their outputs in C++
    (``csrc/tensors.cpp``), and answer NotImplemented for every input declined here.
    """
    kernels = ops()
    if kernels is None:
        return None
    if training or running_mean is None or running_var is None:
        done = kernels.batch_norm_train(
            input, weight, bias, running_mean if training else None,
            running_var if training else None, num_batches_tracked, momentum, eps,
            reject_non_finite, True, with_stats, _threads(),
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


def _eval_layout(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None,
) -> tuple[int, torch.dtype, int, int, int] | None:
    """``_channels`` of an eval-mode input that the kernels take with these tensors."""
    if running_mean is None or running_var is None or not usable():
        return None
    layout = _channels(input)
    if layout is None or _wants_grad(input, weight, bias) or _tracing():
        return None
    if not _vectors(layout[3], layout[1], weight, bias, running_mean, running_var):
        return None
    return layout


def instance_norm_eval(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(``batch_norm_eval``'s output, mean, var): InstanceNorm in eval mode with the
    statistics of each (sample, channel), [N, C], from the read that normalizes."""
    layout = _eval_layout(input, running_mean, running_var, weight, bias)
    kernels = None if layout is None or not input.is_contiguous() else ops()
    if kernels is None:
        return None
    code, dtype, n, c, hw = layout
    output = torch.empty_like(input)
    mean, var = torch.empty(n, c, dtype=dtype), torch.empty(n, c, dtype=dtype)
    kernels.instance_norm_eval_stats(
        code, input.data_ptr(), output.data_ptr(), n, c, hw, _ptr(weight), _ptr(bias),
        running_mean.data_ptr(), running_var.data_ptr(), eps, mean.data_ptr(), var.data_ptr(),
        _threads(),
    )
    return output, mean, var


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
    *, output: bool = True, stats: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """(output, mean, var), the statistics of shape [N, G]; InstanceNorm is G = C.

    ``output=False`` computes the statistics only, ``stats=False`` the output only. Declines
    one value per group (training's error), like torch's group-size check.
    """
    kind = _KINDS.get(input.dtype) if usable() else None
    if kind is None or not input.is_cpu or not input.is_contiguous() or input.is_neg():
        return None
    code, dtype = kind
    shape = input.shape
    numel = input.numel()
    if len(shape) < 2 or numel == 0:
        return None
    n = shape[0]
    c = shape[1]
    hw = numel // (n * c)
    if num_groups <= 0 or c % num_groups or n * (c // num_groups) * hw == 1:
        return None
    if _wants_grad(input, weight, bias) or _tracing() or not _vectors(c, dtype, weight, bias):
        return None
    kernels = ops()
    if kernels is None:
        return None
    out = torch.empty_like(input) if output else None
    mean = torch.empty(n, num_groups, dtype=dtype) if stats else None
    var = torch.empty(n, num_groups, dtype=dtype) if stats else None
    kernels.group_norm(
        code, input.data_ptr(), _ptr(out), n, c, hw, num_groups, _ptr(weight), _ptr(bias), eps,
        _ptr(mean), _ptr(var), _threads(),
    )
    return out, mean, var


def instance_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
    reject_non_finite: bool, with_stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, bool] | None:
    """(output, mean, var, rejected), input statistics [N, C], as ``run_instance_norm`` in
    training: the running statistics (when both given) move towards the batch average of
    the per-instance statistics, unless ``reject_non_finite`` finds one NaN or Inf."""
    layout = _channels(input) if usable() else None
    if layout is None or not input.is_contiguous():
        return None
    code, dtype, n, c, hw = layout
    if hw == 1 or _wants_grad(input, weight, bias) or _tracing():
        return None  # hw == 1: one value per instance, functional raises torch's error
    if not _vectors(c, dtype, weight, bias, running_mean, running_var):
        return None
    kernels = ops()
    if kernels is None:
        return None
    update = running_mean is not None and running_var is not None
    output = torch.empty_like(input)
    mean = torch.empty(n, c, dtype=dtype) if with_stats else None
    var = torch.empty(n, c, dtype=dtype) if with_stats else None
    ok = kernels.instance_norm_train(
        code, input.data_ptr(), output.data_ptr(), n, c, hw, _ptr(weight), _ptr(bias), eps,
        _ptr(mean), _ptr(var), _ptr(running_mean) if update else 0,
        _ptr(running_var) if update else 0, momentum, update and reject_non_finite,
        _threads(),
    )
    if ok and update:
        increment_version((running_mean, running_var))
    return output, mean, var, not ok


_NO_ROWS = (0, 0, 0, None)


def _rows(input: Tensor, shape: tuple[int, ...], weight: Tensor | None,
          bias: Tensor | None = None) -> tuple[int, int, int, torch.dtype | None]:
    """(rows, length, dtype code, statistics dtype) over the last ``len(shape)`` dims;
    length 0 if the kernels don't take them."""
    kind = _KINDS.get(input.dtype)
    if kind is None or not input.is_cpu or not input.is_contiguous() or input.is_neg():
        return _NO_ROWS
    dtype = kind[1]
    k = len(shape)
    have = input.shape
    numel = input.numel()
    if k == 0 or len(have) < k or numel == 0:
        return _NO_ROWS
    if have[-1] != shape[0] if k == 1 else have[-k:] != shape:
        return _NO_ROWS
    if weight is not None and (weight.dtype is not dtype or not weight.is_cpu
                               or weight.shape != shape or not weight.is_contiguous()):
        return _NO_ROWS
    if bias is not None and (bias.dtype is not dtype or not bias.is_cpu
                             or bias.shape != shape or not bias.is_contiguous()):
        return _NO_ROWS
    if _wants_grad(input, weight, bias) or _tracing():
        return _NO_ROWS
    length = have[-1] if k == 1 else math.prod(shape)
    return numel // length, length, kind[0], dtype


def layer_norm(
    input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
    eps: float, *, stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """(output, mean, var), statistics of shape ``input.shape[:-len(shape)]`` if wanted."""
    rows, length, code, dtype = _rows(input, shape, weight, bias) if usable() else _NO_ROWS
    kernels = ops() if length else None
    if kernels is None:
        return None
    output = torch.empty_like(input)
    if not stats:
        kernels.layer_norm(
            code, input.data_ptr(), output.data_ptr(), rows, length,
            0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            eps, 0, 0, _threads(),
        )
        return output, None, None
    lead = input.shape[: input.dim() - len(shape)]
    mean, var = torch.empty(lead, dtype=dtype), torch.empty(lead, dtype=dtype)
    kernels.layer_norm(
        code, input.data_ptr(), output.data_ptr(), rows, length, _ptr(weight), _ptr(bias), eps,
        mean.data_ptr(), var.data_ptr(), _threads(),
    )
    return output, mean, var


def rms_norm(
    input: Tensor, shape: tuple[int, ...], weight: Tensor | None, eps: float | None, *,
    stats: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """(output, mean square), the latter of shape ``input.shape[:-len(shape)]`` if wanted.

    ``eps=None`` is torch's default: the machine epsilon of the statistics' dtype."""
    rows, length, code, dtype = _rows(input, shape, weight) if usable() else _NO_ROWS
    kernels = ops() if length else None
    if kernels is None:
        return None
    if eps is None:
        eps = _MACHINE_EPS[dtype]
    output = torch.empty_like(input)
    lead = input.shape[: input.dim() - len(shape)]
    mean_square = torch.empty(lead, dtype=dtype) if stats else None
    kernels.rms_norm(
        code, input.data_ptr(), output.data_ptr(), rows, length, _ptr(weight), eps,
        _ptr(mean_square), _threads(),
    )
    return output, mean_square


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-channel (mean, biased var) of [N, C, *], as a BatchNorm train step computes them,
    without an output."""
    kernels = ops()
    if kernels is None:
        return None
    done = kernels.batch_norm_train(input, None, None, None, None, None, 0.0, 0.0, False,
                                    False, True, _threads())
    return None if done is NotImplemented else (done[1], done[2])
