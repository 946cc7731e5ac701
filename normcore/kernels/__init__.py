"""Fast paths for ``normcore.functional``: fused C++/OpenMP kernels for CPU tensors of
float32, float16, bfloat16 and float64.

Each family gets one pass over memory where the math allows: BatchNorm train reads its
input twice and writes once (statistics, then one scale-and-shift per channel), BatchNorm
eval folds the running statistics into that scale-and-shift (one read, one write), and
LayerNorm, RMSNorm, GroupNorm and InstanceNorm normalize each row or (sample, group) plane
right after computing its statistics, while it is still in cache. Statistics use shifted
sums in float32 lanes (float64 ones for float64 input) and double across blocks, accurate
for |mean|/std up to 1e4 and beyond. float16 and bfloat16 values are read and written in
their own two bytes, widened to float32 in registers (half inputs run against float32
parameters, as in torch.nn).

The kernels compile on first use (10-40 seconds, then cached per machine; see
``_loader``) or at ``warm_up()``. ``normcore.functional`` falls back to its plain torch path
by itself for every input they do not take (other dtypes, mixes or devices, strided views,
autograd), when they are switched off with ``set_enabled(False)``, and when they cannot be
built (one warning is logged). Both paths give torch.nn's results to the same tolerances.

``tune_allocator()`` keeps freed tensor memory in the process; see ``allocator``.
"""

from ._loader import KernelBuildError, enabled, set_enabled, warm_up
from .allocator import tune_allocator

__all__ = ["KernelBuildError", "enabled", "set_enabled", "tune_allocator", "warm_up"]
