"""Time a 12.8 MB FP32 V2 binary infer request end to end against a bare echo server.

Run from the repository root:

    .venv/bin/python bench/v2_binary.py                 # 60 samples per server
    .venv/bin/python bench/v2_binary.py --repeat 200 --layer digits.bn1
    .venv/bin/python bench/v2_binary.py --env NORMCORE_THREADS=1   # a server setting

Two servers start as subprocesses: ``python -m service`` with the default catalog, and a
bare uvicorn app (plain ASGI, same uvicorn defaults) that reads the request body and
sends the same bytes back. One keep-alive HTTP connection per server posts identical
bytes (the body tritonclient builds for the request) and reads the whole response.
Each server is also posted to by httpx with its default headers, which offer
``Accept-Encoding: gzip, deflate`` as browsers and ``requests`` do: a server that takes the
offer as an order gzips 12.8 MB of floats to save a few percent. Requests alternate between
the contenders, after a warm-up, so drift on the machine hits all alike. Printed: each
contender's median, the ratio of the medians (the rule below) per client, and the median
ratio of back-to-back pairs, which drifts least when other processes come and go on a
shared machine.

The echo is the floor of any server on this stack: it moves the bytes in and out once
and does nothing else. normcore also parses the JSON header, views the tensor in the
request buffer, normalizes it and sends the output from the tensor's own memory.
Project rule: normcore's median is at most 1.5x the echo's, for either client.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the server launcher the tests use too

from tests.server_process import ServerProcess, service_process  # noqa: E402

LIMIT = 1.5
# layer -> input shape of 12.8 MB in FP32 (3.2 M values)
SHAPES = {
    "features.ln": (50_000, 64),
    "features.rms": (50_000, 64),
    "digits.bn1": (200, 16, 40, 25),
    "digits.head.bn": (50_000, 64),
}


async def echo_app(scope, receive, send) -> None:
    """Send the request body back as it came, with the V2 header line a reply needs."""
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    header_length = dict(scope["headers"]).get(b"inference-header-content-length", b"0")
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(body)).encode()),
        (b"inference-header-content-length", header_length),
    ]})
    await send({"type": "http.response.body", "body": body})


def request_body(shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The bytes tritonclient sends for a binary FP32 input, and the JSON header length."""
    import tritonclient.http as triton

    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    tensor = triton.InferInput("x", list(shape), "FP32")
    tensor.set_data_from_numpy(x)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    return body, json_size


class Poster:
    """One keep-alive connection that posts the same body and reads every response."""

    def __init__(self, port: int, path: str, body: bytes, json_size: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.path = path
        self.body = body
        self.headers = {"Inference-Header-Content-Length": str(json_size)}

    def __call__(self) -> tuple[http.client.HTTPResponse, bytes]:
        self.conn.request("POST", self.path, self.body, self.headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.path}: {response.status} {payload[:200]!r}")
        return response, payload


class HttpxPoster:
    """The same through httpx with its default headers (``Accept-Encoding`` included)."""

    def __init__(self, port: int, path: str, body: bytes, json_size: int) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                   timeout=60)
        self.path = path
        self.body = body
        self.headers = {"Inference-Header-Content-Length": str(json_size)}

    def __call__(self):
        response = self.client.post(self.path, content=self.body, headers=self.headers)
        if response.status_code != 200:
            raise RuntimeError(f"{self.path}: {response.status_code} {response.content[:200]!r}")
        return response, response.content


def check(response: http.client.HTTPResponse, payload: bytes, shape: tuple[int, ...]) -> None:
    """normcore's reply parses as tritonclient parses it, with an output of the right shape."""
    import tritonclient.http as triton

    header_length = int(response.getheader("Inference-Header-Content-Length"))
    result = triton.InferenceServerClient.parse_response_body(payload, header_length=header_length)
    output = result.as_numpy("output")
    if output.shape != shape or output.dtype != np.float32:
        raise RuntimeError(f"unexpected output {output.dtype} {output.shape}")


def measure(posters: dict[str, Poster], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per request of each server, sample i of each taken back to back."""
    for _ in range(warmup):
        for post in posters.values():
            post()
    names = list(posters)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        shift = r % len(names)  # rotate which goes first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            posters[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="features.ln", choices=sorted(SHAPES))
    p.add_argument("--repeat", type=int, default=60, help="samples per server (60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests per server (5)")
    p.add_argument("--env", action="append", default=[], metavar="NORMCORE_X=VALUE",
                   help="a setting for the normcore server (repeatable)")
    p.add_argument("--echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo:  # the echo server's own process
        import uvicorn

        uvicorn.run(echo_app, host="127.0.0.1", port=args.echo)
        return 0

    settings = dict(item.split("=", 1) for item in args.env)
    shape = SHAPES[args.layer]
    body, json_size = request_body(shape)
    with tempfile.TemporaryDirectory(prefix="normcore-bench-v2-") as tmp:
        servers = {
            "normcore": service_process(["--port", "{port}"], env=settings,
                                        log=Path(tmp) / "normcore.log"),
            "echo": ServerProcess([sys.executable, str(Path(__file__).resolve()), "--echo",
                                   "{port}"], ready="/", log=Path(tmp) / "echo.log"),
        }
        try:
            for server in servers.values():
                server.start()
            infer = f"/v2/models/{args.layer}/infer"
            posters = {
                "normcore": Poster(servers["normcore"].port, infer, body, json_size),
                "echo": Poster(servers["echo"].port, "/echo", body, json_size),
                "normcore httpx": HttpxPoster(servers["normcore"].port, infer, body,
                                              json_size),
                "echo httpx": HttpxPoster(servers["echo"].port, "/echo", body, json_size),
            }
            check(*posters["normcore"](), shape)
            samples = measure(posters, args.repeat, args.warmup)
        finally:
            for server in servers.values():
                server.stop()
    medians = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{args.layer} FP32 {'x'.join(map(str, shape))}: request {len(body) / 1e6:.1f} MB, "
          f"{args.repeat} samples per contender, {os.cpu_count()} CPUs"
          + (f", normcore with {' '.join(args.env)}" if args.env else ""))
    for name, median in medians.items():
        print(f"median {name:<15} {median * 1e3:8.2f} ms")
    for client in ("", " httpx"):
        ours, echo = samples[f"normcore{client}"], samples[f"echo{client}"]
        ratio = medians[f"normcore{client}"] / medians[f"echo{client}"]
        paired = statistics.median(a / b for a, b in zip(ours, echo, strict=True))
        print(f"{client.strip() or 'plain':>5}: ratio normcore/echo {ratio:.3f} (paired "
              f"{paired:.3f})  -- rule <= {LIMIT}: {'ok' if ratio <= LIMIT else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
