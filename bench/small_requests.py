"""Small-request throughput: POST /normalize (8x64 FP32 JSON) vs a bare uvicorn JSON echo.

Run from the repository root:

    .venv/bin/python bench/small_requests.py           # 3 rounds x 5 s, 16 connections
    .venv/bin/python bench/small_requests.py --rounds 5 --duration 10 --json /tmp/small.json
    .venv/bin/python bench/small_requests.py --env NORMCORE_THREADS=1  # a normcore setting

Two servers start as subprocesses on free ports of 127.0.0.1: ``python -m service`` with
the default catalog (NORMCORE_LOG_LEVEL=warning, plus any ``--env``), and a bare
Starlette app under the same venv's uvicorn (log level warning, uvicorn's defaults: uvloop
and httptools, as normcore uses) that does ``await request.json()`` and sends the object
back as a ``JSONResponse``. Each gets one request checked (normcore against torch's
LayerNorm), a warm-up, then wrk (``--latency``, a Lua script written to a temp folder)
posts the same body over ``--connections`` keep-alive connections. The servers take turns,
round after round, the first of each round alternating, so a busy spell on a shared
machine reaches both alike. Printed per round: requests/s, p50, p99, the server's CPU time
per request (from /proc, steadier than requests/s when other processes compete), then the
median of the per-round ratios normcore/bare requests/s. Goal: at least 1.0x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the server launcher the tests use too

from tests.server_process import ServerProcess, service_process  # noqa: E402

LAYER, SHAPE = "features.ln", (8, 64)
GOAL = 1.0
TICKS = os.sysconf("SC_CLK_TCK")

ECHO_APP = '''
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(await request.json())


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/normalize", echo, methods=["POST"]), Route("/readyz", ready)])
'''

LUA = '''
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
'''


# --- helpers (bench/peers.py imports these too) ---------------------------------------------


def sample_input():
    import numpy as np

    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


def post(port: int, path: str, body: bytes) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def lua_script(folder: Path, name: str, body: bytes) -> Path:
    (folder / f"{name}.json").write_bytes(body)
    script = folder / f"{name}.lua"
    script.write_text(LUA.format(body=folder / f"{name}.json"))
    return script


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (all threads) of a process and its live descendants."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {pid}
    for _ in range(8):  # depth
        tree |= {p for p, (ppid, _) in stats.items() if ppid in tree}
    return sum(stats[p][1] for p in tree if p in stats) / TICKS


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(port: int, path: str, script: Path, duration: float, connections: int,
        threads: int = 1, pid: int | None = None) -> dict:
    """One wrk run: requests/s, p50/p99 in ms, errors, and server CPU µs per request."""
    cpu = cpu_seconds(pid) if pid else None
    out = subprocess.run(
        [shutil.which("wrk") or "/usr/bin/wrk", "-t", str(threads), "-c", str(connections),
         "-d", f"{max(1, round(duration))}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    result = {
        "rps": float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        "requests": requests,
        "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out))
        else 0,
        "socket_errors": sum(map(int, m.groups())) if (m := re.search(
            r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0,
        "load1": os.getloadavg()[0],
    }
    if pid:
        result["cpu_us_per_req"] = (cpu_seconds(pid) - cpu) / max(requests, 1) * 1e6
    return result


def interleave(targets: dict[str, dict], rounds: int, duration: float, connections: int,
               threads: int = 1, warmup: float = 3.0) -> dict[str, list[dict]]:
    """targets: name -> {port, path, script, pid}. Warm each, then take turns per round."""
    for t in targets.values():
        wrk(t["port"], t["path"], t["script"], warmup, connections, threads)
    names = list(targets)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)  # rotate who goes first
        for name in names[shift:] + names[:shift]:
            t = targets[name]
            res = wrk(t["port"], t["path"], t["script"], duration, connections, threads,
                      t.get("pid"))
            results[name].append(res)
            flag = "" if not (res["non2xx"] or res["socket_errors"]) else \
                f"  ERRORS non2xx={res['non2xx']} socket={res['socket_errors']}"
            print(f"  round {r + 1} {name:<22} {res['rps']:9.0f} req/s  p50 "
                  f"{res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms  cpu "
                  f"{res.get('cpu_us_per_req', float('nan')):6.0f} us/req  "
                  f"load {res['load1']:.1f}{flag}", flush=True)
    return results


def summary(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results)
            for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req") if k in results[0]}


def print_medians(results: dict[str, list[dict]], label: str = "server") -> dict[str, dict]:
    """Each target's medians over its rounds, printed as a table; returned as well."""
    medians = {n: summary(r) for n, r in results.items()}
    print(f"\n{label:<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11}")
    for name, m in medians.items():
        print(f"{name:<22} {m['rps']:9.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
              f"{m['cpu_us_per_req']:11.0f}")
    return medians


def paired_ratio(a: list[dict], b: list[dict], key: str = "rps") -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def normcore_server(settings: list[str], log: Path) -> ServerProcess:
    """``python -m service`` on a free port: warnings only, then ``settings`` (KEY=VALUE)."""
    env = {"NORMCORE_LOG_LEVEL": "warning", **dict(item.split("=", 1) for item in settings)}
    return service_process(["--port", "{port}"], env=env, ready_timeout=120, log=log)


def check_layernorm(x, output, what: str) -> None:
    """Raise unless ``output`` (any nesting) is torch's LayerNorm(64) of ``x``."""
    import numpy as np
    import torch

    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (SHAPE[-1],)).numpy()
    got = np.asarray(output, dtype=np.float32).reshape(SHAPE)
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{what}: wrong output, max error {np.abs(got - expected).max()}")


# --- this benchmark ---------------------------------------------------------------------------


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The load generator's options, shared with bench/peers.py."""
    p.add_argument("--rounds", type=int, default=3, help="rounds per server (3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(p)
    p.add_argument("--warmup", type=int, default=3, help="seconds of wrk per server first (3)")
    p.add_argument("--json", metavar="PATH", help="write the rounds and summary here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the normcore server (repeatable)")
    args = p.parse_args(argv)

    x = sample_input()
    body = json.dumps({"layer": LAYER, "mode": "eval", "tensor": {
        "shape": list(SHAPE), "dtype": "float32", "data": x.tolist()}}).encode()
    tmp = Path(tempfile.mkdtemp(prefix="normcore-bench-http-"))
    (tmp / "echo_app.py").write_text(ECHO_APP)
    servers = {
        "normcore": normcore_server(args.env, tmp / "normcore.log"),
        "bare uvicorn echo": ServerProcess(
            [sys.executable, "-m", "uvicorn", "echo_app:app", "--app-dir", str(tmp),
             "--port", "{port}", "--log-level", "warning"], ready_timeout=120,
            log=tmp / "echo.log"),
    }
    try:
        for server in servers.values():
            server.start()
        ports = {name: server.port for name, server in servers.items()}
        check_layernorm(x, post(ports["normcore"], "/normalize", body)["output"]["data"],
                        "normcore")
        if post(ports["bare uvicorn echo"], "/normalize", body) != json.loads(body):
            raise RuntimeError("echo: the reply is not the request")
        script = lua_script(tmp, "normalize", body)
        print(f"POST /normalize {LAYER} {SHAPE[0]}x{SHAPE[1]} float32 JSON ({len(body)} B), "
              f"wrk {args.threads} thread(s), {args.connections} connections, "
              f"{args.rounds} x {args.duration:g} s, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}"
              + (f", normcore with {' '.join(args.env)}" if args.env else ""), flush=True)
        targets = {n: {"port": ports[n], "path": "/normalize", "script": script,
                       "pid": servers[n].pid} for n in servers}
        results = interleave(targets, args.rounds, args.duration, args.connections,
                             args.threads, args.warmup)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    medians = print_medians(results)
    ratio = paired_ratio(results["normcore"], results["bare uvicorn echo"])
    cpu_ratio = paired_ratio(results["bare uvicorn echo"], results["normcore"],
                             "cpu_us_per_req")
    print(f"\nnormcore / bare uvicorn echo: {ratio:.2f}x (goal >= {GOAL:.1f}x) "
          f"{'ok' if ratio >= GOAL else 'BELOW'}")
    print(f"(median of per-round ratios of req/s; by server CPU per request: {cpu_ratio:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "env": args.env, "rounds": args.rounds, "duration": args.duration,
            "connections": args.connections, "threads": args.threads,
            "cpus": os.cpu_count(), "body_bytes": len(body), "results": results,
            "medians": medians, "ratio": ratio, "cpu_ratio": cpu_ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
