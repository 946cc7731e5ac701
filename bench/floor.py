"""How close to a copy the layers can come on this machine: their cost with the data in
cache, where only their arithmetic is left, against a copy of 4 MB.

Run from the repository root (``make test`` builds .venv):

    .venv/bin/python bench/floor.py                       # float32, a minute or two
    .venv/bin/python bench/floor.py --dtypes all --json /tmp/floor.json
    .venv/bin/python bench/floor.py --filter LayerNorm --dtypes float16

For each family, mode and dtype, the layer (fused kernels on) runs on one thread on inputs
of about 128 KB and 512 KB: with their outputs, they stay in that core's L2 cache from call
to call. The difference of the two medians, divided by the difference of their bytes, is
the layer's cost per byte in cache; the per-call overhead drops out. That cost times a
thread's share of the bytes of the 4 MB case of ``bench/kernels.py`` is what the 4 MB case
would take if memory cost nothing: "in cache / copy" is its ratio to the copy of those
4 MB on every thread, the lowest "4 MB / copy" this machine allows. The 4 MB case itself
is timed in the same run, round-robin with the copy and the two cache-sized inputs.

The input shapes keep the planes and rows of ``bench/kernels.py``'s cases (the same work
per value) with fewer channels, so that 128 KB holds at least one sample; the column
layouts keep the width of their rows instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kernels import MB, NOISY, copy_limit, measure  # noqa: E402
from layer_cases import DTYPES, FAMILIES, make_input  # noqa: E402

from normcore import kernels  # noqa: E402

# family -> one sample of the cache-sized inputs: kernels.py's planes and rows, fewer
# channels (GroupNorm keeps 2 channels per group: its layer has C/2 groups). Columns keep
# their width instead (BatchNorm1d [N, C], channels_last's rows of C), with smaller planes.
SAMPLES = {
    "BatchNorm1d": (8, 1024),
    "BatchNorm1d NC": (256,),
    "BatchNorm1d NC10": (10,),
    "BatchNorm2d": (8, 56, 56),
    "BatchNorm2d NHWC": (64, 8, 8),
    "BatchNorm3d": (2, 16, 32, 32),
    "LayerNorm": (1024,),
    "RMSNorm": (1024,),
    "GroupNorm": (8, 56, 56),
    "InstanceNorm2d": (8, 56, 56),
}
SMALL_KB, LARGE_KB = 128, 512


def batch(sample: tuple[int, ...], nbytes: int, itemsize: int) -> tuple[int, ...]:
    return (max(1, round(nbytes / (math.prod(sample) * itemsize))), *sample)


def one_thread(fn):
    """fn on the calling thread alone: its time is one core's, whatever the input size."""
    threads = torch.get_num_threads()

    def call():
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return call


def run_case(family: str, mode: str, dtype: torch.dtype, reps: int) -> dict:
    make, sample4, _ = FAMILIES[family]
    size = torch.empty((), dtype=dtype).element_size()
    shapes = {
        "small": batch(SAMPLES[family], SMALL_KB << 10, size),
        "large": batch(SAMPLES[family], LARGE_KB << 10, size),
        "4 MB": batch(sample4, 4 * MB, size),
    }
    fns, nbytes = {}, {}
    for name, shape in shapes.items():
        layer, _ = make(shape)
        if dtype == torch.float64:
            layer = layer.double()
        layer.train(mode == "train")
        x = make_input(family, shape, dtype)
        fn = lambda layer=layer, x=x: layer(x)  # noqa: E731
        fns[name] = (fn if name == "4 MB" else one_thread(fn), True)
        nbytes[name] = x.numel() * x.element_size()
    x4 = make_input(family, shapes["4 MB"], dtype)
    dst = torch.empty_like(x4)
    fns = {"copy": (lambda: dst.copy_(x4), True), **fns}
    med, _, noise, _ = measure(fns, reps, warmup_s=0.3)
    for _ in range(2):  # the slope doubles the medians' noise: keep the calmest attempt
        if noise <= NOISY:
            break
        again = measure(fns, reps, warmup_s=0.3)
        if again[2] < noise:
            med, _, noise, _ = again
    per_byte = (med["large"] - med["small"]) / (nbytes["large"] - nbytes["small"])
    known = per_byte > 0  # else the two medians crossed: too noisy to say
    copy = med["copy"]
    share = nbytes["4 MB"] / torch.get_num_threads()
    return {
        "family": family, "mode": mode, "dtype": str(dtype).removeprefix("torch."),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "copy_ms": copy * 1e3, "layer_4mb_ms": med["4 MB"] * 1e3,
        "in_cache_ms": per_byte * share * 1e3 if known else None,
        "in_cache_ratio_copy": per_byte * share / copy if known else None,
        "ratio_copy": med["4 MB"] / copy, "noise": noise,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated, or 'all' (float32, float16, bfloat16, float64)")
    p.add_argument("--filter", default="", help="only families whose name contains this")
    p.add_argument("--repeat", type=int, default=40, help="samples per contender (40)")
    p.add_argument("--json", metavar="PATH", help="write the rows here")
    args = p.parse_args(argv)
    dtypes = list(DTYPES) if args.dtypes == "all" else args.dtypes.split(",")
    kernels.tune_allocator()
    if not kernels.warm_up():
        print("the fused kernels are not available here: nothing to measure")
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeat} reps, median per call")
    print(f"{'family':16}  {'mode':5}  {'dtype':8}  {'in cache / copy':>15}  "
          f"{'4 MB / copy':>11}  {'goal':>4}  {'noise':>5}")
    rows = []
    with torch.inference_mode():
        for family in FAMILIES:
            if args.filter.lower() not in family.lower():
                continue
            for name in dtypes:
                for mode in ("train", "eval"):
                    row = run_case(family, mode, DTYPES[name], args.repeat)
                    rows.append(row)
                    floor = row["in_cache_ratio_copy"]
                    print(f"{family:16}  {mode:5}  {row['dtype']:8}  "
                          f"{'-' if floor is None else f'{floor:.2f}':>15}  "
                          f"{row['ratio_copy']:11.2f}  {copy_limit(row):4.1f}  "
                          f"{row['noise']:5.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
