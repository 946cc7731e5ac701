import os

import pytest
import torch

# Apps built in the tests serve no gRPC unless a test asks for a port: the default one (8001)
# could be held by another server on this machine. (Server processes leave NORMCORE_* out
# of their environment; tests/server_process.py turns their gRPC off the same way.)
os.environ["NORMCORE_GRPC_PORT"] = "0"

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
)
DEVICES = ["cpu", CUDA]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
