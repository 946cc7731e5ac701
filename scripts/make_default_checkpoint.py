"""Train the small digits CNN whose BatchNorm statistics back the default layer catalog.

The service's built-in catalog (service/catalog/default.toml) points its ``digits.*``
layers at real running statistics rather than torch defaults. This script produces
them: it trains a small conv net on scikit-learn's bundled 8x8 digits dataset (it
ships inside the sklearn package, so nothing is downloaded), prints train/test
accuracy, and saves the model's ``state_dict()`` to
``service/catalog/digits_cnn.safetensors``.

Run it from the repository root:

    .venv/bin/python scripts/make_default_checkpoint.py           # regenerate
    .venv/bin/python scripts/make_default_checkpoint.py --check   # verify committed file

scikit-learn is needed only to load the data, not by the project at runtime: install it
into the venv first (``.venv/bin/pip install -e '.[examples]'``). ``DigitsCNN`` and the rest
import without it (the tests and examples/adabn_digits.py use them).

The run is fully deterministic (fixed seeds, one thread, deterministic algorithms),
so regenerating on the same platform and torch version gives a byte-identical file;
``--check`` relies on that. Other CPUs or torch versions may round differently.
"""

import argparse
import filecmp
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "service" / "catalog" / "digits_cnn.safetensors"
SEED = 0
EPOCHS = 10
BATCH_SIZE = 64
LR = 3e-3
TEST_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """Conv features plus an MLP head, each with BatchNorm after every linear map."""

    def __init__(self) -> None:
        super().__init__()
        # Sequential submodules give standard keys such as "features.1.running_mean",
        # which default.toml refers to by prefix.
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),  # features.1 -> digits.bn1
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),  # features.4 -> digits.bn2
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),  # features.8 -> digits.bn3
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.BatchNorm1d(64),  # head.2 -> digits.head.bn
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: parallel reductions may sum in a different order between runs.
    torch.set_num_threads(1)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images N,1,8,8 in [0, 1], labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixels are integers 0..16; dividing by 16 puts them in [0, 1].
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N,1,8,8
    y = torch.tensor(digits.target, dtype=torch.int64)
    # Our own seeded permutation keeps the split independent of sklearn versions.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # eval mode: BatchNorm uses the running statistics we are about to ship
    return (model(x).argmax(1) == y).float().mean().item()


def train() -> tuple[DigitsCNN, float, float]:
    seed_everything(SEED)
    x_train, y_train, x_test, y_test = load_data()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    # Decaying the learning rate to zero lets the weights settle, so the running
    # statistics (an average over recent batches) match the final weights and
    # eval-mode accuracy is as good as train-mode accuracy.
    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED + 1)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            if len(idx) < 2:  # BatchNorm1d cannot train on a single sample
                continue
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{EPOCHS}  loss {loss.item():.4f}")
    return model, accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)


def save(model: nn.Module, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # state_dict() includes buffers (running_mean/var, num_batches_tracked);
    # safetensors refuses non-contiguous or shared tensors, so copy each one.
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .safetensors path")
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp file and fail unless it is byte-identical to --out",
    )
    args = parser.parse_args()

    model, train_acc, test_acc = train()
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}")

    if not args.check:
        save(model, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "fresh.safetensors"
        save(model, fresh)
        if args.out.is_file() and filecmp.cmp(fresh, args.out, shallow=False):
            print(f"OK: {args.out} is up to date")
            return 0
    print(f"MISMATCH: {args.out} differs from a fresh run; regenerate it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
