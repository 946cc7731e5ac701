"""Shared state, measured in one run: PostgreSQL against memory, workers against one process,
and how soon a step shows on another replica.

    .venv/bin/python bench/replicas.py                       # 3 rounds x 5 s per server
    .venv/bin/python bench/replicas.py --rounds 5 --duration 10

Starts a throwaway PostgreSQL server (``tests/service/postgres.py``: initdb into a temporary
folder, fsync and synchronous commit on) and the servers below on free ports of 127.0.0.1
(``python -m service``, warnings only), then drives them with wrk over ``--connections``
keep-alive connections, the servers taking turns round after round:

1. **Durable train**: POST /normalize train, ``stream.bn``, an 8x64 base64 batch with a fresh
   request_id each (a Lua counter), on: memory only; PostgreSQL (``--state-url``); the
   one-process journal (``--state-dir``); SQLite in WAL mode (the state dir of
   ``--workers``), one process and two. Goal: PostgreSQL >= 0.5x memory.
2. **Workers**: POST /normalize eval, ``features.ln``, 8x64 JSON, ``--workers 2 --state-dir``
   against one process with the same state dir kind. Goal: >= 1.25x.
3. **Visibility**: two PostgreSQL replicas; a train step acknowledged by one, then /stats of
   the other polled until it shows the step. Goal: worst < 1 s.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from small_requests import (  # noqa: E402
    interleave,
    lua_script,
    paired_ratio,
    sample_input,
    summary,
)

from service.state.shared import SQLite  # noqa: E402
from tests.server_process import ServerProcess, service_process  # noqa: E402
from tests.service.postgres import Cluster  # noqa: E402

TRAIN_LUA = '''
local f = assert(io.open("{prefix}", "rb"))
local prefix = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
local tag = tostring(os.time()) .. "-" .. tostring(math.floor(os.clock() * 1e6))
request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, prefix .. tag .. "-" .. n .. '"}}')
end
'''


def server(args: list[str], log: Path) -> ServerProcess:
    return service_process(["--port", "{port}", "--log-level", "warning", "--device", "cpu",
                            *args], ready_timeout=180, log=log)


def train_script(folder: Path) -> Path:
    x = sample_input()
    tensor = {"shape": list(x.shape), "dtype": "float32",
              "b64": base64.b64encode(x.tobytes()).decode()}
    prefix = json.dumps({"layer": "stream.bn", "mode": "train", "tensor": tensor})
    (folder / "train.prefix").write_text(prefix[:-1] + ', "request_id": "b')
    script = folder / "train.lua"
    script.write_text(TRAIN_LUA.format(prefix=folder / "train.prefix"))
    return script


def sqlite_dir(folder: Path) -> Path:
    """A state dir that holds the workers' SQLite file, so one process serves it too."""
    folder.mkdir(parents=True)
    db = SQLite(folder)
    with db.connect() as conn:
        db.create_schema(conn)
    return folder


def measure(servers: dict[str, ServerProcess], path: str, script: Path,
            args: argparse.Namespace) -> dict[str, list[dict]]:
    try:
        for proc in servers.values():
            proc.start()
        targets = {n: {"port": s.port, "path": path, "script": script, "pid": s.pid}
                   for n, s in servers.items()}
        results = interleave(targets, args.rounds, args.duration, args.connections,
                             warmup=args.warmup)
    finally:
        for proc in servers.values():
            proc.stop()
    for name, rounds in results.items():
        if any(r["non2xx"] or r["socket_errors"] for r in rounds):
            raise SystemExit(f"{name}: requests failed")
    return results


def table(results: dict[str, list[dict]], reference: str) -> None:
    print(f"\n{'server':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11} "
          f"{'ratio':>6}")
    for name, rounds in results.items():
        m = summary(rounds)
        ratio = paired_ratio(rounds, results[reference])
        print(f"{name:<28} {m['rps']:8.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
              f"{m['cpu_us_per_req']:11.0f} {ratio:6.2f}")


def _request(port: int, method: str, path: str, body: bytes | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def visibility(url: str, folder: Path, steps: int) -> list[float]:
    """Seconds from a step's acknowledgement by one replica to its showing on the other."""
    replicas = [server(["--state-url", url], folder / f"replica-{i}.log") for i in range(2)]
    x = sample_input()
    body = json.dumps({"layer": "stream.bn", "mode": "train", "tensor": {
        "shape": list(x.shape), "data": x.tolist()}}).encode()
    delays = []
    try:
        a, b = (r.start() for r in replicas)
        for _ in range(steps):
            count = _request(a.port, "POST", "/normalize", body)["num_batches_tracked"]
            start = time.perf_counter()
            while _request(b.port, "GET", "/stats/stream.bn")["num_batches_tracked"] < count:
                pass
            delays.append(time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        for r in replicas:
            r.stop()
    return delays


def _train(cluster: Cluster, folder: Path, args: argparse.Namespace) -> dict:
    print(f"1. durable train, {args.connections} connections, {args.rounds} x "
          f"{args.duration} s", flush=True)
    train = measure({
        "memory": server([], folder / "memory.log"),
        "postgresql": server(["--state-url", cluster.new_database()], folder / "pg.log"),
        "journal (state dir)": server(["--state-dir", str(folder / "journal")],
                                      folder / "journal.log"),
        "sqlite (state dir)": server(["--state-dir", str(sqlite_dir(folder / "sq1"))],
                                     folder / "sq1.log"),
        "sqlite, --workers 2": server(["--workers", "2", "--state-dir", str(folder / "sq2")],
                                      folder / "sq2.log"),
    }, "/normalize", train_script(folder), args)
    table(train, "memory")
    return train


def _workers(folder: Path, args: argparse.Namespace) -> dict:
    x = sample_input()
    eval_body = json.dumps({"layer": "features.ln", "mode": "eval", "tensor": {
        "shape": list(x.shape), "dtype": "float32", "data": x.tolist()}}).encode()
    print(f"\n2. small eval requests, {args.connections} connections", flush=True)
    workers = measure({
        "1 process": server(["--state-dir", str(sqlite_dir(folder / "w1"))], folder / "w1.log"),
        "--workers 2": server(["--workers", "2", "--state-dir", str(folder / "w2")],
                              folder / "w2.log"),
    }, "/normalize", lua_script(folder, "eval", eval_body), args)
    table(workers, "1 process")
    return workers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="visibility samples")
    parser.add_argument("--part", action="append", choices=("train", "workers", "visibility"),
                        help="measure only this (repeatable; default: all three)")
    args = parser.parse_args()
    parts = set(args.part or ("train", "workers", "visibility"))
    train = workers = delays = None
    folder = Path(tempfile.mkdtemp(prefix="normcore-bench-replicas-"))
    cluster = Cluster.create()
    cluster.start()
    try:
        if "train" in parts:
            train = _train(cluster, folder, args)
        if "workers" in parts:
            workers = _workers(folder, args)
        if "visibility" in parts:
            print("\n3. visibility between two PostgreSQL replicas", flush=True)
            delays = visibility(cluster.new_database(), folder, args.steps)
    finally:
        cluster.destroy()
        shutil.rmtree(folder, ignore_errors=True)
    if train:
        ratio = paired_ratio(train["postgresql"], train["memory"])
        print(f"\npostgresql / memory (train): {ratio:.2f}x (goal >= 0.5x) "
              f"{'ok' if ratio >= 0.5 else 'BELOW'}")
    if workers:
        ratio = paired_ratio(workers["--workers 2"], workers["1 process"])
        print(f"--workers 2 / 1 process (eval): {ratio:.2f}x (goal >= 1.25x) "
              f"{'ok' if ratio >= 1.25 else 'BELOW'}")
    if delays:
        print(f"visibility: {len(delays)} steps, median {statistics.median(delays) * 1e3:.1f} "
              f"ms, worst {max(delays) * 1e3:.1f} ms (goal < 1000 ms) "
              f"{'ok' if max(delays) < 1 else 'BELOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
