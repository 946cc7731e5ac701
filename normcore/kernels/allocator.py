"""Keep freed tensor memory in the process instead of page-faulting it back in every call.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the OS on free; below it, memory freed at the top of the heap is
trimmed once more than ``M_TRIM_THRESHOLD`` is free. Either way, the next tensor of that
size is new memory, and the kernel zero-fills and maps it page by page on first touch:
for a 32 MB output that costs several times what computing it does. ``tune_allocator``
turns both off, so a freed block is reused by the next allocation of that size.

The trade-off: freed memory is kept (up to ``keep_bytes`` at the heap top, and holes below
it) rather than given back, so the resident size stays near its peak. That suits a
process that runs the same shapes over and over (a server, a benchmark, a training loop),
and is why normcore never calls it on import: the service and the benchmark call it at
start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("normcore.kernels")

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_tuned: int | None = None


def tune_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Serve every allocation from the heap and keep up to ``keep_bytes`` free at its top.

    Call it once, early, in a long-lived process. Returns whether it took effect (glibc
    only; elsewhere it does nothing and returns False). Calling it again is harmless.
    """
    global _tuned
    if not 0 <= keep_bytes < 1 << 31:
        raise ValueError(f"keep_bytes must be in [0, 2**31), got {keep_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _tuned == keep_bytes:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, keep_bytes) == 1
    except (OSError, AttributeError) as exc:
        log.warning("could not tune the allocator: %s", exc)
        return False
    if ok:
        _tuned = keep_bytes
    return ok
