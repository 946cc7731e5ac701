"""A local torch model with its norm layers served: ``Client.attach`` and its proxies.

Each mapped norm module of the model is swapped for a ``ServedNorm``, whose forward sends
the input to the server as a binary V2 infer request (``Client.infer``) and returns the
output as a tensor of the input's dtype, on the input's device:

    model ── features.0 (Conv2d, local) ── features.1 (ServedNorm) ── ... ── head
                                                │ POST /v2/models/digits.bn1/infer
                                                ▼ mode = train if model.training else eval

The swap is checked whole before it is made: every module path must name a norm module of
the model whose kind and channel count match its served layer (read from ``/stats``), or
``ModelMismatchError`` names the path and nothing is swapped or sent. The modules taken out
are kept aside untouched and put back by ``Attachment.detach``.

Imported by the client only inside ``attach``: this module needs torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .client import ClientError, ModelMismatchError

if TYPE_CHECKING:
    from .client import Client

# torch.nn's class names, which normcore's layers share.
KINDS = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
)
DATATYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16",
             torch.float64: "FP64"}
DTYPES = {name: dtype for dtype, name in DATATYPES.items()}
# The constructor arguments that fix what a layer takes: its kind's channel count.
_WIDTH_ARGS = ("num_features", "num_channels", "num_groups", "normalized_shape")


def kind_of(module: nn.Module) -> str | None:
    """The norm class a module is (or derives from), torch.nn's or normcore's, else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in KINDS and cls.__module__.split(".")[0] in ("torch", "normcore"):
            return cls.__name__
    return None


def _width(module: nn.Module) -> dict[str, Any]:
    found = {}
    for name in _WIDTH_ARGS:
        value = getattr(module, name, None)
        if value is not None:
            found[name] = list(value) if isinstance(value, tuple | list) else value
    return found


class ServedNorm(nn.Module):
    """Stands in for a norm module: the served layer ``layer`` normalizes its input, as a
    train request while this module is in train mode, an eval request otherwise.

    Input: any shape the served layer takes, float32/float16/bfloat16/float64, on any
    device. Output: the same shape, dtype and device. No gradient flows back through it.
    """

    def __init__(self, client: Client, layer: str, kind: str) -> None:
        super().__init__()
        self.client = client
        self.layer = layer
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        datatype = DATATYPES.get(x.dtype)
        if datatype is None:
            raise TypeError(f"{self.layer}: a served layer takes float32, float16, bfloat16 "
                            f"or float64 input, not {x.dtype}")
        host = x.detach().to("cpu").contiguous()
        raw = host.reshape(-1).view(torch.uint8).numpy()
        mode = "train" if self.training else "eval"
        result = self.client.infer(self.layer, raw, datatype, list(x.shape), mode)
        # One copy out of the reply into memory of our own: the caller may write to the
        # output (an in-place ReLU), which must not touch the reply's immutable bytes.
        out = torch.empty(result.shape, dtype=DTYPES[result.datatype])
        if out.numel():
            out.reshape(-1).view(torch.uint8).numpy()[:] = result.data
        return out.to(x.device)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, kind={self.kind}"


class Attachment:
    """A model whose norm modules are served, until ``detach()`` or the end of a ``with``
    block puts its own modules back. ``layers``: module path -> served layer name."""

    def __init__(self, model: nn.Module, swaps: dict[str, tuple[nn.Module, str, nn.Module]],
                 layers: dict[str, str]) -> None:
        self.model = model
        self.layers = layers
        self._swaps = swaps  # module path -> (parent, attribute, the model's own module)

    def detach(self) -> None:
        """Put the model's own modules back (idempotent); their state is as it was."""
        for parent, attribute, own in self._swaps.values():
            setattr(parent, attribute, own)
        self._swaps = {}

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"Attachment({len(self._swaps)} served: {self.layers})"


def _served(client: Client, path: str, name: str) -> dict[str, Any]:
    try:
        return client.stats(name)
    except ClientError as exc:
        if exc.status == 404:
            raise ModelMismatchError(
                f"module {path!r}: the server has no layer {name!r}") from None
        raise


def _check(client: Client, model: nn.Module, path: str, name: str) -> nn.Module:
    """The module at ``path``, if it fits the served layer ``name``."""
    if not path:
        raise ModelMismatchError("the model itself cannot be replaced: wrap it in a module")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ModelMismatchError(f"module {path!r}: the model has no such module") from None
    kind = kind_of(module)
    if kind is None:
        raise ModelMismatchError(
            f"module {path!r} ({type(module).__name__}) is not a norm layer")
    served = _served(client, path, name)
    if served["kind"] != kind:
        raise ModelMismatchError(
            f"module {path!r} is {kind}; the served layer {name!r} is {served['kind']}")
    local = _width(module)
    remote = {k: served["config"].get(k) for k in local}
    if local != remote:
        raise ModelMismatchError(f"module {path!r} has {local}; the served layer {name!r} "
                                 f"has {remote}")
    return module


def attach(client: Client, model: nn.Module, layers: dict[str, str]) -> Attachment:
    """``Client.attach``, with the mapping resolved: check every module, then swap them."""
    if not layers:
        raise ModelMismatchError("no module is mapped to a served layer")
    own = {path: _check(client, model, path, name) for path, name in layers.items()}
    swaps = {}
    for path, module in own.items():
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        proxy = ServedNorm(client, layers[path], kind_of(module))
        proxy.train(module.training)
        swaps[path] = (parent, attribute, module)
        setattr(parent, attribute, proxy)
    return Attachment(model, swaps, dict(layers))
