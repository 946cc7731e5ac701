"""The statistics page (/ui): served by the service with every asset in the package, open
without a token, and, in a real headless Chromium against a real server process, drawn for
every layer, live as train requests arrive, without a console error."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_process import ServerProcess, service_process

from .browser import chromium, console_errors, missing
from .conftest import make_client
from .reference import tensor

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "service" / "http" / "ui"
ASSETS = sorted(p.name for p in UI.iterdir() if p.name != "index.html")
TOKEN = "ui-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- in-process ---------------------------------------------------------------------------


def test_page_and_assets_need_no_token_when_reads_are_protected() -> None:
    with make_client(api_token=TOKEN, protect_reads=True) as client:
        page = client.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for name in ASSETS:
            asset = client.get(f"/ui/{name}")
            assert asset.status_code == 200, name
            assert asset.content == (UI / name).read_bytes()
        assert client.get("/ui/config.json").json()["protect_reads"] is True
        assert client.get("/stats").status_code == 401  # the data stays protected


def test_page_allows_only_its_own_files_to_run_or_load(client) -> None:
    policy = client.get("/ui").headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    for path in ("/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/index.html%00"):
        assert client.get(path).status_code == 404, path


def test_no_asset_is_fetched_from_elsewhere() -> None:
    allowed = {"http://www.w3.org/2000/svg"}  # an XML namespace, never fetched
    for path in UI.iterdir():
        text = path.read_text()
        assert set(re.findall(r"https?://[^\s\"'`)]+", text)) <= allowed, path.name
        assert "@import" not in text
        assert "@font-face" not in text
    page = (UI / "index.html").read_text()
    assert 'href="docs"' in page  # the API docs, on this server


def test_every_asset_ships_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["service"]
    for path in UI.iterdir():
        relative = str(path.relative_to(ROOT / "service"))
        assert any(fnmatch(relative, pattern) for pattern in globs), relative


# --- in a browser -------------------------------------------------------------------------

SAMPLES = {
    "digits.bn1": (6, 16, 4, 4), "digits.bn2": (6, 32, 2, 2), "digits.bn3": (6, 64, 1, 1),
    "digits.head.bn": (16, 64), "stream.bn": (16, 64), "features.ln": (16, 64),
    "features.rms": (16, 64), "features.gn": (8, 32, 5), "features.in": (8, 16, 6),
}


@pytest.fixture(scope="module")
def browser_ready() -> None:
    why = missing()
    if why is None:
        return
    if os.environ.get("CI"):  # .ci/run installs chromium: its absence there is a failure
        pytest.fail(f"the browser tests cannot run: {why}")
    pytest.skip(f"the browser tests need a browser: {why}")


def _traffic(http: httpx.Client, rounds: int = 3) -> None:
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for name, shape in SAMPLES.items():
            x = rng.normal(0, 1, shape).astype(np.float32)
            reply = http.post("/normalize", json={"layer": name, "tensor": tensor(x)})
            assert reply.status_code == 200, reply.text


def _wait(driver, condition, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def _cards(driver) -> dict[str, dict]:
    """What each layer's card shows: its numbers and the geometry of its plots."""
    return driver.execute_script("""
        const out = {};
        for (const card of document.querySelectorAll("article.card")) {
          const plot = (key) => {
            const fig = card.querySelector(`figure.${key}`);
            const bars = fig.querySelector("path.bars");
            const trace = fig.querySelector("polyline.trace");
            return {bars: bars ? bars.getAttribute("d") : "",
                    trace: trace ? trace.getAttribute("points") : "",
                    width: fig.querySelector("svg").getBoundingClientRect().width};
          };
          out[card.dataset.layer] = {
            batches: card.querySelector(".batches dd").textContent,
            trains: card.querySelector(".trains dd").textContent,
            badge: card.querySelector(".badge").textContent,
            mean: plot("mean"), var: plot("var"), drift: plot("drift"),
          };
        }
        return out;""")


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    with service_process(env={"NORMCORE_DEVICE": "cpu"}) as proc:
        yield proc


@pytest.mark.slow
@pytest.mark.usefixtures("browser_ready")
def test_page_draws_every_layer_and_follows_train_requests(open_server) -> None:
    with httpx.Client(base_url=open_server.url, trust_env=False, timeout=60) as http, \
            chromium(1280, 900) as driver:
        _traffic(http)
        layers = set(http.get("/stats").json()["layers"])
        driver.get(open_server.url + "/ui")
        _wait(driver, lambda d: set(_cards(d)) == layers)
        cards = _wait(driver, lambda d: (c := _cards(d)) and all(
            card["drift"]["trace"] for card in c.values()) and c)
        for name, card in cards.items():
            for key in ("mean", "var"):
                assert card[key]["bars"].count("M") >= 1, (name, key)
                assert card[key]["width"] > 100, (name, key)
            assert card["badge"].startswith("drift "), name
        before = cards["stream.bn"]
        x = np.random.default_rng(1).normal(3, 2, (32, 64)).astype(np.float32)
        body = {"layer": "stream.bn", "mode": "train", "tensor": tensor(x)}
        assert http.post("/normalize", json=body).status_code == 200
        after = _wait(driver, lambda d: (c := _cards(d)["stream.bn"])["trains"] == "1" and c)
        assert int(after["batches"]) == int(before["batches"]) + 1
        assert after["mean"]["bars"] != before["mean"]["bars"]
        assert after["var"]["bars"] != before["var"]["bars"]
        assert console_errors(driver) == []


@pytest.mark.slow
@pytest.mark.usefixtures("browser_ready")
def test_protected_reads_ask_for_the_token_once_per_tab() -> None:
    env = {"NORMCORE_DEVICE": "cpu", "NORMCORE_API_TOKEN": TOKEN,
           "NORMCORE_PROTECT_READS": "true"}
    with service_process(env=env) as server, chromium(390, 844) as driver, \
            httpx.Client(base_url=server.url, headers=AUTH, trust_env=False) as http:
        _traffic(http, rounds=1)
        driver.get(server.url + "/ui")
        _wait(driver, lambda d: d.find_element("id", "login").is_displayed())
        assert _cards(driver) == {}
        driver.find_element("id", "token").send_keys(TOKEN)
        driver.find_element("css selector", "#login button[type=submit]").click()
        _wait(driver, lambda d: len(_cards(d)) == len(SAMPLES))
        assert driver.execute_script("return sessionStorage.getItem('normcore.token')") == TOKEN
        driver.refresh()  # the same tab: no second question
        _wait(driver, lambda d: len(_cards(d)) == len(SAMPLES))
        assert not driver.find_element("id", "login").is_displayed()
        # A phone-sized window: one column, plots as wide as the screen allows.
        widths = [card["mean"]["width"] for card in _cards(driver).values()]
        assert min(widths) > 250
        assert console_errors(driver) == []
