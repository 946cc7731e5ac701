"""Plot ``bench/kernels.py --json`` results: one panel per family and mode. By default, time
against input size, one line per contender (normcore's fast path, its torch fallback,
torch.nn, copy) for one dtype; with ``--ratio``, normcore's time over torch.nn's against
input size, one line per dtype (below 1: faster than torch.nn).

    .venv/bin/python bench/kernels.py --dtypes all --json /tmp/kernels.json
    .venv/bin/python bench/plot.py /tmp/kernels.json -o /tmp/kernels.png      # float32
    .venv/bin/python bench/plot.py /tmp/kernels.json --ratio -o /tmp/ratios.png

Needs matplotlib (``.venv/bin/pip install matplotlib``); nothing else in the project does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONTENDERS = [  # key in the JSON rows, label, line style
    ("normcore_ms", "normcore (kernels)", {"color": "tab:blue", "marker": "o"}),
    ("fallback_ms", "normcore (torch path)", {"color": "tab:cyan", "marker": ".", "ls": ":"}),
    ("torch_ms", "torch.nn", {"color": "tab:orange", "marker": "s"}),
    ("copy_ms", "copy into a buffer", {"color": "gray", "marker": "", "ls": "--"}),
]


DTYPE_COLORS = {"float32": "tab:blue", "float16": "tab:green", "bfloat16": "tab:purple",
                "float64": "tab:red"}


def plot(data: dict, out: Path, dtype: str = "float32", ratio: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if ratio or r.get("dtype", "float32") == dtype]
    families = list(dict.fromkeys(r["family"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(families), len(modes), squeeze=False,
                             figsize=(5 * len(modes), 2.8 * len(families)))
    for i, family in enumerate(families):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mine = sorted((r for r in rows if r["family"] == family and r["mode"] == mode),
                          key=lambda r: r["mb"])
            if ratio:
                for name, color in DTYPE_COLORS.items():
                    line = [r for r in mine if r.get("dtype", "float32") == name]
                    if line:
                        ax.plot([r["mb"] for r in line], [r["ratio_torch"] for r in line],
                                label=name, color=color, marker="o")
                ax.axhline(1.0, color="gray", ls="--", lw=1)
            else:
                sizes = [r["mb"] for r in mine]
                for key, label, style in CONTENDERS:
                    if mine and key in mine[0]:
                        ax.plot(sizes, [r[key] for r in mine], label=label, **style)
                ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_title(f"{family} {mode}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(families) - 1:
                ax.set_xlabel("input size (MB)")
            if j == 0:
                ax.set_ylabel("normcore / torch.nn" if ratio else "median time per call (ms)")
    axes[0][0].legend(fontsize=8)
    tuned = "allocator tuned" if data.get("allocator_tuned") else "allocator as is"
    what = "time relative to torch.nn" if ratio else dtype
    fig.suptitle(f"{what}: torch {data.get('torch')}, {data.get('threads')} threads, {tuned}")
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="results written by bench/kernels.py --json")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG file (default: JSON's name)")
    p.add_argument("--dtype", default="float32", help="the dtype whose times are plotted")
    p.add_argument("--ratio", action="store_true",
                   help="normcore / torch.nn per dtype instead of times")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    out = args.out or args.json.with_suffix(".png")
    plot(data, out, args.dtype, args.ratio)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
