"""Train requests per second with durability on (``--state-dir``) versus off, in one run.

    .venv/bin/python bench/durability.py                   # 16 clients, 3 rounds of 4 s
    .venv/bin/python bench/durability.py --clients 32 --seconds 2 --rounds 5

Starts two servers on 127.0.0.1 (``python -m service``: one memory-only, one with a fresh
state dir in a temporary folder) and drives each with the same load generator: ``--clients``
concurrent connections, each sending one train request at a time to ``stream.bn`` (a [8, 64]
batch, base64, a fresh request_id each). Rounds alternate between the two servers, after a
warm-up, so drift on a noisy machine hits both alike; the medians are compared.

Project rule: durable throughput is at least 0.5x the memory-only throughput, which group
commit makes possible (one fsync covers every request that arrived while the last one ran).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the server launcher the tests use too

from tests.server_process import ServerProcess, service_process  # noqa: E402

LIMIT = 0.5


def durability_server(args: list[str], log: Path) -> ServerProcess:
    """``python -m service`` on a free port, logging warnings only (no access log)."""
    return service_process(["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
                            *args], log=log)


async def _load(url: str, clients: int, seconds: float, body: dict) -> float:
    """Train requests per second over ``seconds`` from ``clients`` concurrent connections."""
    ids = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await client.post("/normalize", json={**body, "request_id": f"b{next(ids)}"})
                if r.status_code != 200:
                    raise SystemExit(f"request failed: {r.status_code} {r.text}")
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0, help="per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    body = {"layer": "stream.bn", "mode": "train", "tensor": {
        "shape": [8, 64], "dtype": "float32", "b64": base64.b64encode(x.numpy().tobytes())
        .decode()}}
    with tempfile.TemporaryDirectory(prefix="normcore-bench-") as tmp:
        folder = Path(tmp)
        servers = {
            "memory": durability_server([], folder / "memory.log"),
            "durable": durability_server(["--state-dir", str(folder / "state")],
                                         folder / "durable.log"),
        }
        try:
            for server in servers.values():
                server.start()
            rates: dict[str, list[float]] = {name: [] for name in servers}
            for server in servers.values():
                asyncio.run(_load(server.url, args.clients, args.warmup, body))
            for _ in range(args.rounds):
                for name, server in servers.items():
                    rates[name].append(
                        asyncio.run(_load(server.url, args.clients, args.seconds, body)))
        finally:
            for server in servers.values():
                server.stop()
    memory, durable = (statistics.median(rates[n]) for n in ("memory", "durable"))
    ratio = durable / memory
    print(f"clients {args.clients}, {args.rounds} rounds of {args.seconds:g} s per server")
    for name in ("memory", "durable"):
        each = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:8s} {statistics.median(rates[name]):8.0f} train req/s  (rounds: {each})")
    verdict = "ok" if ratio >= LIMIT else f"BELOW the {LIMIT}x rule"
    print(f"durable / memory = {ratio:.2f}x  ({verdict})")
    return 0 if ratio >= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
