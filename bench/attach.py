"""What attaching a model costs: a forward pass with served norm layers against the local
model, and the two transports a layer call could use.

Run from the repository root:

    .venv/bin/python bench/attach.py                 # both parts, a minute or two
    .venv/bin/python bench/attach.py --repeat 60
    .venv/bin/python bench/attach.py --env NORMCORE_THREADS=1   # a server setting

One server starts as a subprocess (``python -m service``, default catalog, CPU), and one
client (``service.client.Client``, one keep-alive connection) talks to it.

1. **Transport**, one layer call (``digits.bn1``, BatchNorm2d 16, eval) on a small and a
   large activation: the binary V2 infer request that ``Client.attach`` sends (raw bytes
   after a JSON header) against ``POST /normalize`` with a base64 tensor, and the local
   ``torch.nn.BatchNorm2d`` call for scale.
2. **Model**, the digits CNN (scripts/make_default_checkpoint.py) in eval and train mode,
   batch 32 (small activations, 128 KB into the first BatchNorm) and 2048 (8 MB): the
   forward pass attached (``prefix="digits."``, four layer calls to the server) against the
   same model run locally. ``per call`` is the attached pass's extra time divided by the
   four layer calls.

Contenders take turns within each repetition after a warm-up, so drift on a busy machine
reaches all of them alike; times are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the server launcher the tests use, the digits CNN

from scripts.make_default_checkpoint import DEFAULT_OUT, DigitsCNN  # noqa: E402
from service.client import Client  # noqa: E402
from tests.server_process import service_process  # noqa: E402

SMALL, LARGE = 32, 2048  # batch sizes; bn1 sees batch x 16 x 8 x 8 float32


def timed(contenders: dict[str, Callable[[], object]], repeat: int,
          warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each contender, taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(warmup + repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def transport(nc: Client, repeat: int) -> None:
    print("\n1. one layer call, digits.bn1 eval: V2 binary vs /normalize base64 vs local")
    print(f"{'input':>16} {'MB':>6} {'V2 ms':>8} {'b64 ms':>8} {'local ms':>9} "
          f"{'b64/V2':>7} {'V2/local':>9}")
    bn = torch.nn.BatchNorm2d(16).eval()
    for batch in (SMALL, LARGE):
        x = torch.randn(batch, 16, 8, 8)
        raw = x.numpy()
        shape = list(x.shape)
        with torch.no_grad():
            t = timed({
                "v2": lambda raw=raw, shape=shape: nc.infer("digits.bn1", raw, "FP32", shape),
                "b64": lambda raw=raw: nc.normalize("digits.bn1", raw),
                "local": lambda x=x: bn(x),
            }, repeat)
        print(f"{'x'.join(map(str, shape)):>16} {x.numel() * 4 / 2**20:6.2f} {t['v2']:8.3f} "
              f"{t['b64']:8.3f} {t['local']:9.3f} {t['b64'] / t['v2']:7.2f} "
              f"{t['v2'] / t['local']:9.1f}")


def model_pass(nc: Client, repeat: int) -> None:
    print("\n2. digits CNN forward, attached (4 served BatchNorms) vs local")
    print(f"{'mode':>5} {'batch':>6} {'attached ms':>12} {'local ms':>9} {'ratio':>7} "
          f"{'per call ms':>12}")
    state = safetensors.torch.load_file(DEFAULT_OUT)
    served, local = DigitsCNN(), DigitsCNN()
    served.load_state_dict(state)
    local.load_state_dict(state)
    with nc.attach(served, prefix="digits.") as attached:
        calls = len(attached.layers)
        for mode in ("eval", "train"):
            for batch in (SMALL, LARGE):
                x = torch.randn(batch, 1, 8, 8)
                served.train(mode == "train")
                local.train(mode == "train")
                with torch.no_grad():
                    t = timed({"attached": lambda x=x: served(x),
                               "local": lambda x=x: local(x)}, repeat)
                extra = (t["attached"] - t["local"]) / calls
                print(f"{mode:>5} {batch:>6} {t['attached']:12.3f} {t['local']:9.3f} "
                      f"{t['attached'] / t['local']:7.1f} {extra:12.3f}")
    for name in attached.layers.values():
        nc.reset_layer(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per contender")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the server (repeatable)")
    args = parser.parse_args()
    env = {"NORMCORE_DEVICE": "cpu", **dict(kv.split("=", 1) for kv in args.env)}
    torch.set_num_threads(1)  # the client's side: the server has the other core
    np.random.seed(0)
    torch.manual_seed(0)
    with service_process(env=env) as server, Client(server.url) as nc:
        print(f"torch {torch.__version__}, client on 1 thread, server {env}, "
              f"{args.repeat} reps, median per call")
        transport(nc, args.repeat)
        model_pass(nc, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
