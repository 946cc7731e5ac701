"""normcore: normalization layers with PyTorch's exact semantics.

Every layer matches its ``torch.nn`` namesake (constructor, parameter and buffer names,
state dict keys, outputs, running-statistic updates) and adds ``normalize(x)``, which also
returns the statistics of ``x`` computed in the same pass.
"""

from . import checkpoint, functional, kernels
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .errors import CheckpointError, InputError, NonFiniteError, NormcoreError
from .functional import Normalized, RMSNormalized
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CheckpointError",
    "GroupNorm",
    "InputError",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "NonFiniteError",
    "Normalized",
    "NormcoreError",
    "RMSNorm",
    "RMSNormalized",
    "checkpoint",
    "functional",
    "kernels",
]
