"""Small requests against peer servers: normcore vs Seldon MLServer vs LitServe.

Run from the repository root:

    .venv/bin/python bench/peers.py                      # 3 rounds x 5 s, 16 connections
    .venv/bin/python bench/peers.py --rounds 5 --json /tmp/peers.json
    .venv/bin/python bench/peers.py --only mlserver      # skip LitServe

Every server answers the same 8x64 FP32 input through ``torch.nn.LayerNorm(64)`` in eval
mode (normcore: its built-in ``features.ln``, the same layer):

- normcore, ``POST /normalize`` with its own JSON tensor body;
- normcore, ``POST /v2/models/features.ln/infer`` with a JSON V2 request (flat ``data``);
- MLServer, a custom ``MLModel`` runtime in a temp model folder, the same V2 request on
  ``/v2/models/ln/infer`` (server settings left at their defaults, access log off);
- LitServe, a ``LitAPI`` (decode_request / predict / encode_response) on ``/predict`` with
  ``{"data": [[...]]}``.

The peers run in virtual environments of their own, created once under
``~/.cache/normcore-bench/venvs`` (``NORMCORE_BENCH_CACHE`` moves it) and reused while their
pins below are unchanged: torch first (the CPU build pinned here, so no dependency can pull a
CUDA one), then the server. A peer that cannot be installed or started is reported and
skipped. Each server has one reply checked against torch before it is timed. Then wrk (one
run, the servers taking turns each round, as in bench/small_requests.py) measures
requests/s, p50 and p99, and the servers' CPU time per request (all their processes).
Goals on small requests: normcore >= 1.2x MLServer and >= 4x LitServe in requests/s, at no
worse p99.

The peers' own defaults are what they ship with: torch with one intra-op thread per core,
MLServer's inference in one worker process (parallel_workers 1), LitServe's multiprocessing
queues. On a small shared machine the first of these dominates: a 64-wide LayerNorm is
parallelized over both cores, and whenever another process holds one of them the op waits
for its time slice (milliseconds instead of microseconds), so the peers' numbers swing with
the machine's load. ``--peer-threads 1 --mlserver-workers 0 --litserve-fast-queue`` gives
each peer its best small-request setup; report both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import small_requests as hb  # bench/ is on sys.path when this file runs as a script

sys.path.insert(0, str(hb.ROOT))  # the server launcher the tests use too

from tests.server_process import ServerProcess, free_port  # noqa: E402

TORCH = "torch==2.13.0"  # the CPU wheel; installed before the server so it stays
PINS = {  # what was measured: the server, then its HTTP stack (constraints, not extras)
    # httptools: the HTTP parser normcore runs on. uvloop < 0.22: with 0.22 and up, MLServer
    # 1.7.1's inference workers die at start (SeldonIO/MLServer#2286).
    "mlserver": (["mlserver==1.7.1", "httptools==0.9.0"],
                 ["fastapi==0.115.14", "starlette==0.46.2", "uvicorn==0.54.0",
                  "uvloop==0.21.0", "orjson==3.13.0", "numpy==2.4.6", "pydantic==2.14.4"]),
    "litserve": (["litserve==0.2.19"],
                 ["fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0",
                  "uvloop==0.23.0", "httptools==0.9.0", "pyzmq==27.3.0", "numpy==2.4.6",
                  "pydantic==2.14.4"]),
}
GOALS = {"MLServer": 1.2, "LitServe": 4.0}

MLSERVER_RUNTIME = '''
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class LayerNormRuntime(MLModel):
    async def load(self) -> bool:
        self.layer = torch.nn.LayerNorm(64).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.inference_mode():
            y = self.layer(x).numpy()
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output("output", y)])
'''

LITSERVE_APP = '''
import sys

import litserve as ls
import torch


class LayerNormAPI(ls.LitAPI):
    def setup(self, device):
        self.layer = torch.nn.LayerNorm(64).eval()

    def decode_request(self, request):
        return torch.tensor(request["data"], dtype=torch.float32)

    def predict(self, x):
        with torch.inference_mode():
            return self.layer(x)

    def encode_response(self, output):
        return {"output": output.tolist()}


if __name__ == "__main__":
    ls.LitServer(LayerNormAPI(), accelerator="cpu", fast_queue=sys.argv[2] == "1").run(
        host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
        generate_client_file=False)
'''


def venv(name: str, cache: Path) -> Path | None:
    """The peer's venv python, installed if missing or pinned differently; None on failure."""
    folder = cache / name
    python = folder / "bin" / "python"
    server, stack = PINS[name]
    wanted = " ".join([TORCH, *server, "|", *stack])
    marker = folder / "normcore-bench-pins.txt"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"installing {name} into {folder} (once) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    constraints = folder.parent / f"{name}-constraints.txt"
    constraints.write_text("\n".join([TORCH, *stack]) + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for cmd in ([sys.executable, "-m", "venv", str(folder)], [*pip, TORCH],
                [*pip, "-c", str(constraints), *server]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"  {name}: cannot install ({' '.join(cmd[-2:])} failed):\n"
                  + "\n".join([line for line in (run.stderr or run.stdout).splitlines()
                               if line.strip() and not line.startswith("WARNING")][-8:]))
            return None
    marker.write_text(wanted)
    return python


def versions(python: Path, packages: list[str]) -> str:
    code = ("import importlib.metadata as m, sys\n"
            "print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))")
    return subprocess.run([str(python), "-c", code, *packages], capture_output=True,
                          text=True).stdout.strip()


def v2_body(x) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hb.add_load_options(p)
    p.add_argument("--only", action="append", choices=sorted(PINS), help="peers to run")
    p.add_argument("--mlserver-workers", type=int, metavar="N",
                   help="MLServer parallel_workers (default: MLServer's own, 1; 0 = in-process)")
    p.add_argument("--litserve-fast-queue", action="store_true",
                   help="LitServer(fast_queue=True): ZeroMQ instead of multiprocessing queues")
    p.add_argument("--peer-threads", type=int, metavar="N",
                   help="torch intra-op threads in the peers (OMP_NUM_THREADS; default: "
                   "torch's own, one per core)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of wrk per server first (3)")
    p.add_argument("--json", metavar="PATH", help="write the rounds and summary here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the normcore server (repeatable)")
    args = p.parse_args(argv)
    cache = Path(os.environ.get("NORMCORE_BENCH_CACHE",
                                Path.home() / ".cache" / "normcore-bench")) / "venvs"

    x = hb.sample_input()
    bodies = {
        "normalize": json.dumps({"layer": hb.LAYER, "mode": "eval", "tensor": {
            "shape": list(x.shape), "dtype": "float32", "data": x.tolist()}}).encode(),
        "v2": v2_body(x),
        "litserve": json.dumps({"data": x.tolist()}).encode(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="normcore-bench-peers-"))
    scripts = {k: hb.lua_script(tmp, k, body) for k, body in bodies.items()}
    targets, servers, used = {}, [], {}
    used["normcore"] = versions(Path(sys.executable), ["torch", "fastapi", "starlette",
                                                       "uvicorn", "uvloop", "httptools"])

    def launch(name: str, server: ServerProcess, path: str, script: str, check) -> None:
        try:
            server.start()
        except RuntimeError as exc:
            print(f"{name}: cannot start: {exc}")
            return
        servers.append(server)
        try:
            check(hb.post(server.port, path, bodies[script]))
        except Exception as exc:  # noqa: BLE001 - any failure: say so, skip this one
            print(f"{name}: first request failed, not timed: {exc}")
            return
        targets[name] = {"port": server.port, "path": path, "script": scripts[script],
                         "pid": server.pid}

    try:
        normcore = hb.normcore_server(args.env, tmp / "normcore.log")
        launch("normcore /normalize", normcore, "/normalize", "normalize",
               lambda r: hb.check_layernorm(x, r["output"]["data"], "normcore /normalize"))
        v2_path = f"/v2/models/{hb.LAYER}/infer"
        try:
            if targets:
                hb.check_layernorm(x, hb.post(normcore.port, v2_path,
                                              bodies["v2"])["outputs"][0]["data"], "normcore V2")
                targets["normcore V2 JSON"] = {**targets["normcore /normalize"],
                                               "path": v2_path, "script": scripts["v2"]}
        except Exception as exc:  # noqa: BLE001
            print(f"normcore V2 JSON: first request failed, not timed: {exc}")
        for peer in args.only or sorted(PINS):
            python = venv(peer, cache)
            if python is None:
                continue
            used[peer] = versions(python, ["torch", peer, "fastapi", "starlette", "uvicorn",
                                           "uvloop", "httptools"])
            env = {"OMP_NUM_THREADS": str(args.peer_threads)} if args.peer_threads else {}
            folder = tmp / peer
            folder.mkdir()
            options = {"env": env, "cwd": folder, "ready_timeout": 120}
            if peer == "mlserver":
                port = free_port()  # written into MLServer's settings file
                (folder / "ln").mkdir()
                (folder / "ln" / "ln_runtime.py").write_text(MLSERVER_RUNTIME)
                (folder / "ln" / "model-settings.json").write_text(json.dumps(
                    {"name": "ln", "implementation": "ln_runtime.LayerNormRuntime"}))
                settings = {"debug": False, "host": "127.0.0.1", "http_port": port,
                            "grpc_port": free_port(), "metrics_port": free_port()}
                if args.mlserver_workers is not None:
                    settings["parallel_workers"] = args.mlserver_workers
                (folder / "settings.json").write_text(json.dumps(settings))
                server = ServerProcess([str(python.parent / "mlserver"), "start", str(folder)],
                                       port=port, ready="/v2/models/ln/ready",
                                       log=tmp / "MLServer.log", **options)
                launch("MLServer", server, "/v2/models/ln/infer", "v2",
                       lambda r: hb.check_layernorm(x, r["outputs"][0]["data"], "MLServer"))
            else:
                (folder / "app.py").write_text(LITSERVE_APP)
                server = ServerProcess([str(python), "app.py", "{port}",
                                        str(int(args.litserve_fast_queue))], ready="/health",
                                       log=tmp / "LitServe.log", **options)
                launch("LitServe", server, "/predict", "litserve",
                       lambda r: hb.check_layernorm(x, r["output"], "LitServe"))
        print(f"\n{hb.SHAPE[0]}x{hb.SHAPE[1]} float32 JSON, wrk {args.threads} thread(s), "
              f"{args.connections} connections, {args.rounds} x {args.duration} s, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; peers: torch threads "
              f"{args.peer_threads or 'default'}, MLServer parallel_workers "
              f"{'default' if args.mlserver_workers is None else args.mlserver_workers}, "
              f"LitServe fast_queue {args.litserve_fast_queue}", flush=True)
        for name, v in used.items():
            print(f"  {name}: {v}")
        results = hb.interleave(targets, args.rounds, args.duration, args.connections,
                                args.threads, args.warmup)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {n: hb.summary(r) for n, r in results.items()}
    print(f"\n{'server':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11}")
    for name, m in medians.items():
        print(f"{name:<20} {m['rps']:8.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
              f"{m['cpu_us_per_req']:11.0f}")
    ratios = {}
    print("\nmedian of per-round ratios (req/s and peer/normcore CPU: higher is better for "
          "normcore; p99: lower is):")
    for peer, goal in GOALS.items():
        for ours in ("normcore /normalize", "normcore V2 JSON"):
            if peer not in results or ours not in results:
                continue
            rps = hb.paired_ratio(results[ours], results[peer])
            p99 = hb.paired_ratio(results[ours], results[peer], "p99_ms")
            cpu = hb.paired_ratio(results[peer], results[ours], "cpu_us_per_req")
            ok = rps >= goal and p99 <= 1.0
            ratios[f"{ours} / {peer}"] = {"rps": rps, "p99": p99, "cpu": cpu}
            print(f"  {ours} / {peer}: {rps:5.2f}x req/s (goal >= {goal:.1f}x), "
                  f"p99 {p99:4.2f}x, {cpu:5.2f}x by CPU per request  "
                  f"{'ok' if ok else 'BELOW'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rounds": args.rounds, "duration": args.duration, "env": args.env,
            "connections": args.connections, "threads": args.threads,
            "mlserver_workers": args.mlserver_workers, "peer_threads": args.peer_threads,
            "litserve_fast_queue": args.litserve_fast_queue,
            "cpus": os.cpu_count(), "versions": used, "results": results,
            "medians": medians, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
