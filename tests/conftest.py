import pytest
import torch

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
)
DEVICES = ["cpu", CUDA]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
