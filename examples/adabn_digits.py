"""AdaBN with served BatchNorm layers: adapt the digits CNN to a covariate shift.

The built-in catalog serves the four BatchNorm layers of a small CNN trained on
scikit-learn's 8x8 digits (scripts/make_default_checkpoint.py) as the model ``digits.``.
This script runs that CNN locally with its BatchNorms attached to the served layers, and:

1. resets the four layers to the trained statistics;
2. measures accuracy on the clean test set and under a covariate shift (``x * 0.5 + 0.35`` plus
   Gaussian noise of std 0.1, seed 0): the source statistics no longer fit;
3. streams the shifted test set through the model once in train mode, in batches of 32:
   each BatchNorm call is a train request, and the server adapts the running statistics;
4. measures accuracy again, on the shifted and on the clean test set (eval requests);
5. exports the adapted state (``GET /models/digits./state``) and checks that a plain
   local model with that state gets the same accuracy, with no server involved.

Run it from the repository root against a running server (with write access: step 1
resets, step 3 trains):

    make serve                                         # in another shell
    .venv/bin/pip install -e '.[examples]'             # scikit-learn, for the data
    .venv/bin/python examples/adabn_digits.py [--url URL] [--token TOKEN] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model and data of the catalog's checkpoint

from scripts.make_default_checkpoint import DEFAULT_OUT, DigitsCNN, load_data  # noqa: E402
from service.client import Client  # noqa: E402

PREFIX = "digits."
BATCH = 32


def shift(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The covariate shift: lower contrast, a brighter background, sensor noise."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x * 0.5 + 0.35 + 0.1 * noise


def source_model() -> DigitsCNN:
    """The trained CNN, with the statistics the catalog's layers start from."""
    model = DigitsCNN()
    model.load_state_dict(safetensors.torch.load_file(DEFAULT_OUT))
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    right = sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum())
                for i in range(0, len(x), 256))
    return right / len(y)


@torch.no_grad()
def adapt(model: nn.Module, x: torch.Tensor) -> None:
    """One pass over ``x`` in train mode: BatchNorm folds each batch into its statistics."""
    model.train()
    for i in range(0, len(x), BATCH):
        model(x[i:i + BATCH])
    model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("NORMCORE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("NORMCORE_API_TOKEN"))
    parser.add_argument("--out", type=Path, help="also write the adapted state here")
    args = parser.parse_args()

    _, _, x_test, y_test = load_data()
    shifted = shift(x_test)
    model = source_model()
    print(f"digits test set: {len(y_test)} images; shift x * 0.5 + 0.35 + N(0, 0.1^2)")

    with Client(args.url, args.token) as nc:
        for name in nc.model_layers(PREFIX).values():
            nc.reset_layer(name)
        with nc.attach(model, prefix=PREFIX) as attached:
            print(f"attached: {attached.layers}")
            before = accuracy(model, shifted, y_test)
            clean_before = accuracy(model, x_test, y_test)
            adapt(model, shifted)
            after = accuracy(model, shifted, y_test)
            clean = accuracy(model, x_test, y_test)
        state = nc.state_dict(prefix=PREFIX)

    print(f"clean,   source statistics:  {clean_before:.1%}")
    print(f"shifted, source statistics:  {before:.1%}")
    print(f"shifted, adapted statistics: {after:.1%}")
    print(f"clean,   adapted statistics: {clean:.1%}")

    if args.out:
        safetensors.torch.save_file(state, str(args.out))
        print(f"adapted state ({len(state)} tensors) written to {args.out}")
    local = source_model()
    local.load_state_dict(state, strict=False)
    reproduced = accuracy(local, shifted, y_test)
    print(f"plain local model with the exported state, shifted: {reproduced:.1%}")
    if reproduced != after:
        print("MISMATCH: the exported state does not reproduce the adapted accuracy",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
