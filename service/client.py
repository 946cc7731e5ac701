"""A small Python client for the normcore service (httpx only), for scripts and notebooks.

    >>> from service.client import Client
    >>> with Client("http://127.0.0.1:8000") as nc:
    ...     result = nc.normalize("stream.bn", np.random.randn(32, 64), mode="train")
    ...     result.output.shape, result.stats["mean"].shape, result.num_batches_tracked
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

# numpy has no bfloat16: such tensors are sent and returned as float32.
_WIRE = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}


class ClientError(Exception):
    """The service answered with an error status; ``message`` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"[{status}] {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class NormalizeResult:
    output: np.ndarray
    stats: dict[str, np.ndarray]  # mean/var, or mean_square for RMSNorm
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
    """Talks to one normcore server. ``token`` is sent as a bearer token when given."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

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

    def stats(self, layer: str | None = None) -> dict[str, Any]:
        """All layers' statistics and server counters, or one layer's entry."""
        return self._call("GET", f"/stats/{layer}" if layer else "/stats").json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

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
