"""Device names: the one pattern that the settings, the catalog and the admin API accept,
and the check that a named device exists on this machine."""

from __future__ import annotations

import re

import torch

# At most four digits of index: a longer one cannot name a device and would overflow
# torch's parser.
DEVICE = re.compile(r"^(cpu|cuda(:\d{1,4})?)\Z")
DEVICE_OR_AUTO = re.compile(r"^(auto|cpu|cuda(:\d{1,4})?)\Z")
DEVICE_HELP = "cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for here; ``auto`` is the first CUDA device when there is
    one, else the CPU. ``ValueError`` naming the problem if there is no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE.match(name):
        raise ValueError(f"device must be {DEVICE_HELP}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} requested but CUDA is not available here")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name} does not exist here "
                             f"({torch.cuda.device_count()} CUDA devices)")
    return device
