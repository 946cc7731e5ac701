"""Take docs/ui.png: the statistics page (/ui) of a real server after some train and eval
traffic, in headless Chromium.

    .venv/bin/python scripts/screenshot_ui.py                 # docs/ui.png, 1440 wide
    .venv/bin/python scripts/screenshot_ui.py --width 390 --mobile -o /tmp/phone.png

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium
chromium-driver``) and the ``selenium`` package (the ``dev`` extra). The traffic is made up:
a layer ``sensors.bn`` (BatchNorm1d 16, drift_threshold 0.5) learns from a stream, then
sees its mean move by one standard deviation; the built-in layers get eval batches, drawn
from their running statistics where they have them, some of them changed late.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import service_process  # noqa: E402
from tests.service.browser import chromium  # noqa: E402


def _post(client: httpx.Client, layer: str, x: np.ndarray, mode: str = "eval") -> None:
    body = {"layer": layer, "mode": mode,
            "tensor": {"shape": list(x.shape), "data": x.astype(np.float32).ravel().tolist()}}
    reply = client.post("/normalize", json=body)
    reply.raise_for_status()


def _like(client: httpx.Client, layer: str, shape: tuple[int, ...], rng: np.random.Generator,
          shift: float = 0.0) -> np.ndarray:
    """A batch drawn from ``layer``'s running statistics, its mean moved by ``shift`` sd."""
    stats = client.get(f"/stats/{layer}").json()
    mean, sd = np.array(stats["running_mean"]), np.sqrt(np.array(stats["running_var"]))
    view = (1, -1) + (1,) * (len(shape) - 2)
    return rng.normal(0, 1, shape) * sd.reshape(view) + (mean + shift * sd).reshape(view)


def traffic(client: httpx.Client, seconds: float) -> None:
    """A stream of train and eval batches; in the last third some layers see a change."""
    rng = np.random.default_rng(7)
    client.put("/layers/sensors.bn", json={
        "kind": "BatchNorm1d", "config": {"num_features": 16, "momentum": "cumulative"},
        "drift_threshold": 0.5}).raise_for_status()
    scale = rng.uniform(0.5, 2.0, 16)
    centre = rng.normal(0, 1, 16)
    for _ in range(40):
        _post(client, "sensors.bn", rng.normal(centre, scale, (64, 16)), "train")
        _post(client, "stream.bn", rng.normal(1, 2, (64, 64)), "train")
    digits = {"digits.bn1": (16, 16, 4, 4), "digits.bn2": (16, 32, 2, 2),
              "digits.bn3": (64, 64, 1, 1), "digits.head.bn": (64, 64)}
    steps = 60
    for step in range(steps):
        late = step > steps * 2 // 3
        _post(client, "sensors.bn", rng.normal(centre + scale * late, scale, (64, 16)))
        _post(client, "stream.bn", rng.normal(1, 2 * (1 + late), (64, 64)))
        for name, shape in digits.items():
            shift = 1.0 if late and name == "digits.bn2" else 0.0
            _post(client, name, _like(client, name, shape, rng, shift))
        _post(client, "features.ln", rng.normal(0, 1, (32, 64)) + 0.8 * late)
        _post(client, "features.rms", rng.normal(0, 1, (32, 64)))
        _post(client, "features.gn", rng.normal(0, 1, (8, 32, 4)))
        _post(client, "features.in", rng.normal(0, 1, (8, 16, 12)))
        time.sleep(seconds / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "ui.png")
    parser.add_argument("--width", type=int, default=1440, help="CSS pixels (1440)")
    parser.add_argument("--height", type=int, default=0, help="0: the whole page (0)")
    parser.add_argument("--mobile", action="store_true", help="as a phone (touch, scale 2)")
    parser.add_argument("--seconds", type=float, default=30, help="of eval traffic (30)")
    args = parser.parse_args()
    env = {"NORMCORE_DEVICE": "cpu", "NORMCORE_LOG_LEVEL": "warning"}
    with service_process(["--port", "{port}"], env=env) as server, \
            httpx.Client(base_url=server.url, trust_env=False, timeout=60) as client, \
            chromium(args.width, 900) as browser:
        view = {"width": args.width, "height": args.height or 900, "mobile": args.mobile,
                "deviceScaleFactor": 2 if args.mobile else 1}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", view)
        browser.get(server.url + "/ui")
        traffic(client, args.seconds)
        time.sleep(2.5)  # a poll or two
        if not args.height:  # the whole page in one picture
            view["height"] = browser.execute_script(
                "return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", view)
            time.sleep(1.5)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
