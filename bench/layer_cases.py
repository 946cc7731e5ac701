"""The layers and inputs that ``kernels.py`` and ``floor.py`` time: each family's layer
pair (normcore and torch.nn, the same state), the shape of one sample, and the input
layout."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
import normcore  # noqa: E402


def _pair(name: str, *args, **kwargs) -> tuple[nn.Module, nn.Module]:
    """normcore and torch.nn layers built alike; torch's state copied over (same params)."""
    ref = getattr(nn, name)(*args, **kwargs)
    ours = getattr(normcore, name)(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# family -> (layer pair for an input shape, shape of one sample/row, small shape < 64 KB).
# Big shapes are the sample shape with a leading dim chosen to reach each target size.
# "NC" and "NHWC" are the layouts whose statistics are column sums: BatchNorm1d on [N, C],
# BatchNorm2d on a channels_last input (see CHANNELS_LAST).
FAMILIES = {
    "BatchNorm1d": (lambda s: _pair("BatchNorm1d", s[1]), (64, 1024), (8, 16, 32)),
    "BatchNorm1d NC": (lambda s: _pair("BatchNorm1d", s[1]), (256,), (64, 16)),
    # 10 features: rows under one vector, read 8 (float64: 4) at a time
    "BatchNorm1d NC10": (lambda s: _pair("BatchNorm1d", s[1]), (10,), (64, 10)),
    "BatchNorm2d": (lambda s: _pair("BatchNorm2d", s[1]), (64, 56, 56), (8, 16, 4, 4)),
    "BatchNorm2d NHWC": (lambda s: _pair("BatchNorm2d", s[1]), (64, 56, 56), (8, 16, 4, 4)),
    "BatchNorm3d": (lambda s: _pair("BatchNorm3d", s[1]), (32, 16, 32, 32), (8, 16, 2, 4, 4)),
    "LayerNorm": (lambda s: _pair("LayerNorm", s[-1]), (1024,), (8, 64)),
    "RMSNorm": (lambda s: _pair("RMSNorm", s[-1]), (1024,), (8, 64)),
    # 32 groups of 2 channels at 64 channels; C/2 groups for the small case too.
    "GroupNorm": (lambda s: _pair("GroupNorm", s[1] // 2, s[1]), (64, 56, 56), (8, 16, 4, 4)),
    # Running statistics on, so train mode also pays for their update (affine as well).
    "InstanceNorm2d": (
        lambda s: _pair("InstanceNorm2d", s[1], affine=True, track_running_stats=True),
        (64, 56, 56),
        (8, 16, 4, 4),
    ),
}


CHANNELS_LAST = {"BatchNorm2d NHWC"}  # families whose input is made channels_last


def make_input(family: str, shape, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """A random input of ``shape`` and ``dtype`` in the family's layout."""
    x = torch.randn(shape, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if family in CHANNELS_LAST else x


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
