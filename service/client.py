"""A small Python client for the normcore service (httpx only), for scripts and notebooks.

    >>> from service.client import Client
    >>> with Client("http://127.0.0.1:8000") as nc:
    ...     result = nc.normalize("stream.bn", np.random.randn(32, 64), mode="train")
    ...     result.output.shape, result.stats["mean"].shape, result.num_batches_tracked

A whole local torch model can run its norm layers on the server (``attach``) and take their
adapted state back (``state_dict``); torch is imported only there, so the client itself
needs httpx and numpy alone:

    >>> with nc.attach(model, prefix="digits."):
    ...     model.train()(batch)                  # each BatchNorm call is a train request
    >>> model.load_state_dict(nc.state_dict(prefix="digits."), strict=False)
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

if TYPE_CHECKING:
    import torch

    from .attach import Attachment

# numpy has no bfloat16: such tensors are sent and returned as float32.
_WIRE = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}


class ClientError(Exception):
    """The service answered with an error status; ``message`` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"[{status}] {message}")
        self.status = status
        self.message = message


class ModelMismatchError(ValueError):
    """A local model does not fit the served layers it is mapped to (a missing module, a
    layer the server lacks, another kind or channel count); nothing was attached or sent."""


@dataclass(frozen=True)
class NormalizeResult:
    output: np.ndarray
    stats: dict[str, np.ndarray]  # mean/var, or mean_square for RMSNorm
    num_batches_tracked: int | None


@dataclass(frozen=True)
class InferResult:
    """A binary V2 infer reply: the output's little-endian, row-major bytes."""

    data: memoryview
    datatype: str  # FP32, FP16, BF16 or FP64: the input's
    shape: list[int]
    num_batches_tracked: int | None


def encode_array(array: Any, dtype: str | None = None) -> dict[str, Any]:
    """A numpy array (or anything np.asarray takes) as a base64 tensor object."""
    array = np.asarray(array)
    name = dtype or (array.dtype.name if array.dtype.name in _WIRE else "float32")
    if name == "bfloat16":
        raise ValueError("send bfloat16 as float32 (numpy has no bfloat16)")
    data = np.ascontiguousarray(array, dtype=_WIRE[name])
    return {"shape": list(array.shape), "dtype": name,
            "b64": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """A tensor object from the service as a numpy array."""
    shape = obj["shape"]
    if "data" in obj:
        return np.asarray(obj["data"], dtype=_WIRE.get(obj["dtype"], "<f4")).reshape(shape)
    raw = base64.b64decode(obj["b64"])
    if obj["dtype"] == "bfloat16":  # widen the 16-bit patterns to float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=_WIRE[obj["dtype"]]).reshape(shape)


class Client:
    """Talks to one normcore server over one keep-alive connection. ``token`` is sent as a
    bearer token when given; ``infer`` tries a call ``retries`` more times after a
    transport error (connection lost, timeout)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 60.0, *, retries: int = 2,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout,
                                  transport=transport)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ClientError(response.status_code, message)
        return response

    # --- data plane ---------------------------------------------------------------------

    def normalize(self, layer: str, tensor: Any, mode: str = "eval", *,
                  dtype: str | None = None, request_id: str | None = None) -> NormalizeResult:
        """Normalize ``tensor`` with ``layer``; ``mode="train"`` updates its statistics."""
        body: dict[str, Any] = {"layer": layer, "mode": mode,
                                "tensor": encode_array(tensor, dtype)}
        if request_id is not None:
            body["request_id"] = request_id
        reply = self._call("POST", "/normalize", json=body).json()
        return NormalizeResult(
            decode_array(reply["output"]),
            {k: decode_array(v) for k, v in reply["batch_stats"].items()},
            reply.get("num_batches_tracked"),
        )

    def infer(self, layer: str, data: Any, datatype: str, shape: Sequence[int],
              mode: str = "eval") -> InferResult:
        """One tensor through ``layer`` as a binary V2 infer request: ``data`` holds its
        little-endian, row-major bytes (any buffer), ``datatype`` is FP32, FP16, BF16 or
        FP64. A train call carries a fresh ``request_id``, and a retry after a transport
        error reuses it, so the server applies the batch once however often it is sent."""
        data = memoryview(data).cast("B")
        params: dict[str, Any] = {"mode": mode}
        if mode == "train":
            params["request_id"] = uuid.uuid4().hex
        head = json.dumps({
            "inputs": [{"name": "x", "datatype": datatype, "shape": list(shape),
                        "parameters": {"binary_data_size": len(data)}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
            "parameters": params,
        }, separators=(",", ":")).encode()
        # NOTE: identity: httpx offers gzip by default, and the server would compress.
        headers = {"Inference-Header-Content-Length": str(len(head)),
                   "Content-Type": "application/octet-stream", "Accept-Encoding": "identity"}
        reply = self._retried("POST", f"/v2/models/{layer}/infer", content=head + data,
                              headers=headers)
        content = reply.content
        length = int(reply.headers.get("inference-header-content-length", len(content)))
        meta = json.loads(content[:length])
        output = meta["outputs"][0]
        size = output["parameters"]["binary_data_size"]
        return InferResult(memoryview(content)[length:length + size], output["datatype"],
                           output["shape"], meta.get("parameters", {}).get("num_batches_tracked"))

    def _retried(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``_call``, tried again (``retries`` times, backing off) after a transport error:
        the request is sent again as it was, request_id included."""
        for attempt in range(self.retries + 1):
            try:
                return self._call(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def stats(self, layer: str | None = None) -> dict[str, Any]:
        """All layers' statistics and server counters, or one layer's entry."""
        return self._call("GET", f"/stats/{layer}" if layer else "/stats").json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # --- whole models -------------------------------------------------------------------

    def model_layers(self, prefix: str) -> dict[str, str]:
        """A catalog model's served layers by module path (``GET /models/{prefix}``)."""
        return self._call("GET", f"/models/{prefix}").json()["layers"]

    def download_model_state(self, prefix: str) -> bytes:
        """A catalog model's state as safetensors bytes, keyed by module path."""
        return self._call("GET", f"/models/{prefix}/state").content

    def attach(self, model: torch.nn.Module, layers: Mapping[str, str] | None = None,
               prefix: str | None = None) -> Attachment:
        """Replace the norm modules of a local torch ``model`` by served layers.

        ``layers`` maps module paths to layer names (``{"features.1": "digits.bn1"}``);
        ``prefix`` takes the mapping of the server's catalog model of that name_prefix
        (``[[model]]``: layer names are ``prefix + module path``). Each replaced module
        sends its input to its layer, as a train request while the model is in train mode
        and an eval request otherwise, and returns the output in the input's dtype and on
        its device (no gradient flows back through it). ``ModelMismatchError`` names the
        module path of a mapping that does not fit (no such module, a layer the server
        lacks, another kind or channel count) before anything is replaced or sent.

        The returned ``Attachment`` puts the model's own modules back, unchanged, on
        ``detach()`` or at the end of a ``with`` block (an exception included).
        """
        from .attach import attach

        return attach(self, model, self._mapping(layers, prefix))

    def state_dict(self, layers: Mapping[str, str] | None = None,
                   prefix: str | None = None) -> dict[str, torch.Tensor]:
        """The served layers' current state keyed by module path (``features.1.weight``,
        ..., ``features.1.num_batches_tracked``), for ``model.load_state_dict(...,
        strict=False)``. With ``prefix``, one read of the catalog model's state
        (``GET /models/{prefix}/state``); with ``layers``, each layer's state (``GET
        /layers/{name}/state``, which needs the token when the server has one)."""
        import safetensors.torch

        if prefix is not None and layers is None:
            return safetensors.torch.load(self.download_model_state(prefix))
        state = {}
        for module, name in self._mapping(layers, prefix).items():
            for key, value in safetensors.torch.load(self.download_state(name)).items():
                state[f"{module}.{key}"] = value
        return state

    def _mapping(self, layers: Mapping[str, str] | None, prefix: str | None) -> dict[str, str]:
        if (layers is None) == (prefix is None):
            raise ValueError("give either layers (module path -> layer name) or prefix")
        return dict(layers) if layers is not None else self.model_layers(prefix)

    # --- admin --------------------------------------------------------------------------

    def put_layer(self, name: str, kind: str, config: dict[str, Any], *,
                  checkpoint: bytes | None = None, prefix: str = "",
                  device: str | None = None) -> dict[str, Any]:
        """Create or replace a layer; ``checkpoint`` is a safetensors file's bytes."""
        body: dict[str, Any] = {"kind": kind, "config": config, "prefix": prefix}
        if checkpoint is not None:
            body["checkpoint_b64"] = base64.b64encode(checkpoint).decode("ascii")
        if device is not None:
            body["device"] = device
        return self._call("PUT", f"/layers/{name}", json=body).json()

    def delete_layer(self, name: str) -> None:
        self._call("DELETE", f"/layers/{name}")

    def reset_layer(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/layers/{name}/reset").json()

    def download_state(self, name: str) -> bytes:
        """The layer's state as safetensors bytes."""
        return self._call("GET", f"/layers/{name}/state").content

    def upload_state(self, name: str, safetensors_bytes: bytes) -> dict[str, Any]:
        return self._call("PUT", f"/layers/{name}/state", content=safetensors_bytes,
                          headers={"Content-Type": "application/octet-stream"}).json()
