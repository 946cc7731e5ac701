"""Small train requests against small eval requests, in memory and with a state dir.

Run from the repository root:

    .venv/bin/python bench/train_requests.py            # 3 rounds x 5 s, 16 connections
    .venv/bin/python bench/train_requests.py --rounds 5 --json /tmp/train.json

Two ``python -m service`` servers start on free ports: one keeps state in memory, one in
a state dir (every train reply waits for its journal record's fsync, shared by concurrent
requests). wrk posts the same 8x64 FP32 JSON to ``stream.bn`` (BatchNorm1d, cumulative
momentum) over keep-alive connections, as ``bench/small_requests.py`` does: eval on the
memory server, train on both. The three take turns round after round. Printed: requests/s,
latency and server CPU per request, then two ratios of medians of per-round req/s:
train / eval in memory (goal >= 0.8) and durable train / memory train (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from small_requests import (  # noqa: E402
    add_load_options,
    interleave,
    lua_script,
    normcore_server,
    paired_ratio,
    post,
    print_medians,
    sample_input,
)

LAYER = "stream.bn"
GOAL = 0.8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(p)
    p.add_argument("--warmup", type=int, default=3, help="seconds of wrk per target first (3)")
    p.add_argument("--json", metavar="PATH", help="write the rounds and summary here")
    args = p.parse_args(argv)

    x = sample_input()
    tensor = {"shape": list(x.shape), "dtype": "float32", "data": x.tolist()}
    bodies = {mode: json.dumps({"layer": LAYER, "mode": mode, "tensor": tensor}).encode()
              for mode in ("eval", "train")}
    tmp = Path(tempfile.mkdtemp(prefix="normcore-bench-train-"))
    servers = {
        "memory": normcore_server([], tmp / "memory.log"),
        "durable": normcore_server([f"NORMCORE_STATE_DIR={tmp / 'state'}"], tmp / "durable.log"),
    }
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            reply = post(server.port, "/normalize", bodies["train"])
            if reply.get("num_batches_tracked") != 1:
                raise RuntimeError(f"{name}: a train request was not counted: {reply}")
        scripts = {mode: lua_script(tmp, mode, body) for mode, body in bodies.items()}
        targets = {
            "eval (memory)": ("memory", "eval"),
            "train (memory)": ("memory", "train"),
            "train (durable)": ("durable", "train"),
        }
        targets = {name: {"port": servers[server].port, "path": "/normalize",
                          "script": scripts[mode], "pid": servers[server].pid}
                   for name, (server, mode) in targets.items()}
        print(f"POST /normalize {LAYER} {x.shape[0]}x{x.shape[1]} float32 JSON, wrk "
              f"{args.threads} thread(s), {args.connections} connections, {args.rounds} x "
              f"{args.duration:g} s, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
              flush=True)
        results = interleave(targets, args.rounds, args.duration, args.connections,
                             args.threads, args.warmup)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    medians = print_medians(results, "target")
    ratios = {
        "train / eval (memory)": paired_ratio(results["train (memory)"],
                                              results["eval (memory)"]),
        "durable / memory (train)": paired_ratio(results["train (durable)"],
                                                 results["train (memory)"]),
    }
    print()
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x (goal >= {GOAL}x) {'ok' if ratio >= GOAL else 'BELOW'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "medians": medians,
                                               "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
