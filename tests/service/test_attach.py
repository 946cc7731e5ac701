"""A whole local model attached to a real server process: the digits CNN of the default
catalog, its four BatchNorms served. Eval matches the local model, train mode adapts the
served statistics exactly as torch.nn would, the model comes back unchanged, and the
adapted state loads into a plain model."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest
import safetensors.torch
import torch
from torch import nn

from scripts.make_default_checkpoint import DigitsCNN
from service.client import Client, ModelMismatchError
from service.core.catalog import default_catalog
from tests.server_process import ServerProcess, service_process

CHECKPOINT = default_catalog().parent / "digits_cnn.safetensors"
DIGITS = {"features.1": "digits.bn1", "features.4": "digits.bn2", "features.8": "digits.bn3",
          "head.2": "digits.head.bn"}
BATCH = 32


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A server of this module's own: its tests train the digits layers."""
    with service_process(env={"NORMCORE_DEVICE": "cpu"}) as proc:
        yield proc


@pytest.fixture
def nc(server: ServerProcess) -> Iterator[Client]:
    """A client, with the digits layers back at their checkpoint's statistics."""
    with Client(server.url) as client:
        for name in DIGITS.values():
            client.reset_layer(name)
        yield client


def digits_model() -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(safetensors.torch.load_file(CHECKPOINT))
    return model.eval()


def shifted_images(n: int = 8 * BATCH + 7, seed: int = 0) -> torch.Tensor:
    """Digit-sized images under the covariate shift of the AdaBN example (x * 0.5 + 0.35
    plus noise): synthetic, so the test needs no data set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    return x * 0.5 + 0.35 + 0.1 * torch.randn(x.shape, generator=gen)


def adapt(model: nn.Module, x: torch.Tensor) -> None:
    """Stream ``x`` through the model once in train mode, batch by batch."""
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            model(x[i:i + BATCH])
    model.eval()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def test_attached_eval_equals_the_local_model(nc: Client) -> None:
    model, local = digits_model(), digits_model()
    x = shifted_images()
    with nc.attach(model, prefix="digits.") as attached:
        assert attached.layers == DIGITS
        assert type(model.features[1]).__name__ == "ServedNorm"
        served = logits(model, x)
    torch.testing.assert_close(served, logits(local, x), rtol=1e-5, atol=1e-5)


def test_adaptation_reproduces_a_local_model_in_train_mode(nc: Client) -> None:
    model, local = digits_model(), digits_model()
    x = shifted_images()
    labels = logits(digits_model(), x).argmax(1)  # what the source model says
    adapt(local, x)
    with nc.attach(model, layers=DIGITS):
        adapt(model, x)
        served = logits(model, x)
    torch.testing.assert_close(served, logits(local, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(served.argmax(1), logits(local, x).argmax(1))  # accuracy equal
    assert (served.argmax(1) == labels).float().mean() < 1  # and the statistics moved
    state = nc.state_dict(prefix="digits.")
    own = local.state_dict()
    for path in DIGITS:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(state[f"{path}.{key}"], own[f"{path}.{key}"],
                                       rtol=1e-5, atol=1e-6)
        assert int(state[f"{path}.num_batches_tracked"]) == int(
            own[f"{path}.num_batches_tracked"])


def test_exported_state_dict_reproduces_the_adapted_outputs(nc: Client) -> None:
    model = digits_model()
    x = shifted_images()
    with nc.attach(model, prefix="digits."):
        adapt(model, x)
        served = logits(model, x)
    fresh = digits_model()
    missing, unexpected = fresh.load_state_dict(nc.state_dict(prefix="digits."), strict=False)
    assert unexpected == []
    assert not [k for k in missing if k.startswith(tuple(DIGITS))]
    torch.testing.assert_close(logits(fresh, x), served, rtol=1e-5, atol=1e-5)
    # The explicit mapping reads each layer's state instead: the same tensors.
    by_layer = nc.state_dict(layers=DIGITS)
    whole = nc.state_dict(prefix="digits.")
    assert by_layer.keys() == whole.keys()
    assert all(torch.equal(by_layer[k], whole[k]) for k in whole)


def _own_modules(model: nn.Module) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    return {name: (m, copy.deepcopy(m.state_dict())) for name, m in model.named_modules()}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    now = dict(model.named_modules())
    assert now.keys() == before.keys()
    for name, (module, state) in before.items():
        assert now[name] is module, name
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[key]), f"{name}.{key}"


def test_the_model_is_restored_after_the_block(nc: Client) -> None:
    model = digits_model()
    before = _own_modules(model)
    with nc.attach(model, prefix="digits."):
        adapt(model, shifted_images())
    _assert_unchanged(model, before)


def test_the_model_is_restored_when_the_block_raises(nc: Client) -> None:
    model = digits_model()
    before = _own_modules(model)


    def block() -> None:
        with nc.attach(model, prefix="digits."):
            adapt(model, shifted_images())
            raise RuntimeError("in the block")

    with pytest.raises(RuntimeError, match="in the block"):
        block()
    _assert_unchanged(model, before)


def _requests(nc: Client) -> dict[str, dict[str, int]]:
    return {name: nc.stats(name)["requests"] for name in DIGITS.values()}


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: setattr(m.features, "4", nn.BatchNorm2d(8)), "'features.4' has"),
    (lambda m: setattr(m.head, "2", nn.BatchNorm2d(64)), "'head.2' is BatchNorm2d"),
    (lambda m: setattr(m.features, "8", nn.Identity()), "'features.8' \\(Identity\\) is not"),
    (lambda m: delattr(m.head, "2"), "'head.2': the model has no such module"),
])
def test_a_mismatching_model_is_refused_before_anything_is_sent(nc: Client, change,
                                                                message: str) -> None:
    model = digits_model()
    change(model)
    before, counts = _own_modules(model), _requests(nc)
    with pytest.raises(ModelMismatchError, match=message):
        nc.attach(model, prefix="digits.")
    _assert_unchanged(model, before)
    assert _requests(nc) == counts


def test_an_unknown_layer_is_refused_by_module_path(nc: Client) -> None:
    model = digits_model()
    with pytest.raises(ModelMismatchError, match="'head.2': the server has no layer 'nope'"):
        nc.attach(model, layers={**DIGITS, "head.2": "nope"})
    assert type(model.head[2]) is nn.BatchNorm1d


class _LoseFirstTrainReply(httpx.HTTPTransport):
    """Delivers the first train request, then loses its reply, as a dropped connection
    would: the server has applied the batch, the client does not know."""

    lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if b'"mode":"train"' in request.content and not self.lost:
            self.lost += 1
            response.read()
            response.close()
            raise httpx.ReadError("connection lost", request=request)
        return response


def test_a_retried_train_batch_is_counted_once(server: ServerProcess, nc: Client) -> None:
    transport = _LoseFirstTrainReply()
    model = nn.Sequential(nn.BatchNorm1d(64))
    x = torch.randn(BATCH, 64)
    before = nc.stats("digits.head.bn")["num_batches_tracked"]
    with Client(server.url, transport=transport) as flaky, \
            flaky.attach(model, layers={"0": "digits.head.bn"}):
        model.train()(x)
    assert transport.lost == 1
    assert nc.stats("digits.head.bn")["num_batches_tracked"] == before + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_outputs_keep_the_input_dtype(nc: Client, dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64)).to(dtype)
    x = torch.randn(4, 8, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        with nc.attach(model, layers={"1": "features.ln"}):
            served = model(x)
    assert served.dtype == dtype
    torch.testing.assert_close(served, expected)
