"""Wire formats <-> tensors for the JSON API.

A tensor travels as ``{"shape": [...], "dtype": "float32", "data": [...]}`` with ``data``
flat or nested, or with ``"b64"`` instead of ``data``: the little-endian bytes in row-major
order, base64-encoded. Decoding checks everything a client can get wrong and raises
``InvalidRequestError`` with a message that names the problem and never echoes the payload.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch

from ..core.errors import InvalidRequestError, MalformedRequestError, PayloadTooLargeError

# name -> (torch dtype, little-endian numpy dtype of the wire bytes)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),  # raw 16-bit patterns
    "float64": (torch.float64, np.dtype("<f8")),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
ENCODINGS = ("list", "b64")
_FINITE_MAX = {name: float(torch.finfo(t).max) for name, (t, _) in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    max_rank: int = 8
    max_elements: int = 64 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024


# Work that holds the GIL in one C call (a JSON parse, a base64 pass, a list to an array)
# stalls the event loop's thread however it is scheduled, so big tensors are converted a
# slice at a time, and JSON bodies are capped (Limits.max_json_bytes): big tensors travel
# as V2 binary data, which is viewed in place.
_VALUES_PER_STEP = 1 << 18
MAX_EMPTY_SPAN = 1 << 16  # see check_shape
MAX_JSON_NODES = 1 << 16  # lists, objects and keys: see parse_json
_B64_CHARS_PER_STEP = 1 << 22  # a multiple of 4


def parse_json(body: bytes | bytearray, limits: Limits | None = None) -> Any:
    """Parse a JSON body: ``MalformedRequestError`` if it is not JSON, ``InvalidRequestError``
    if it only uses NaN/Infinity, ``PayloadTooLargeError`` past ``limits.max_json_bytes``."""
    if limits is not None and len(body) > limits.max_json_bytes:
        raise PayloadTooLargeError(
            f"a JSON body of {len(body)} bytes exceeds max_json_bytes ({limits.max_json_bytes}, "
            "NORMCORE_MAX_JSON_BYTES); send big tensors as V2 binary data")
    # Millions of tiny lists or objects, or of keys, cost seconds of one GIL-holding parse
    # (and its garbage collections) and half a gigabyte: nested data is for small tensors,
    # and a request has a few dozen keys. (":" counts the keys; base64 has none.)
    if len(body) > MAX_JSON_NODES and sum(
            body.count(c) for c in (b"[", b"{", b":")) > MAX_JSON_NODES:
        raise MalformedRequestError(
            f"the JSON holds more than {MAX_JSON_NODES} lists, objects and keys; send tensor "
            "data flat (or as V2 binary data)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc):
            raise InvalidRequestError("a number in the JSON overflows to infinity") from None
        # NOTE: orjson stops at the first token it refuses and reports where; looking there
        # (rather than re-parsing with the stdlib) keeps a huge malformed body cheap.
        if body[exc.pos:exc.pos + 8].startswith((b"NaN", b"Infinity")):
            raise InvalidRequestError("NaN and Infinity are not valid JSON numbers") from None
        raise MalformedRequestError(f"malformed JSON: {exc}") from None


def check_shape(value: Any, limits: Limits, what: str = "tensor") -> tuple[int, ...]:
    """``value`` as a shape within ``limits``; ``InvalidRequestError`` naming the problem.

    A request is limited by what it makes, not only by what it sends. A layer's outputs and
    statistics are never larger than twice its input, except for an empty input: ``[10**6,
    16, 0]`` sends nothing yet asks for ``[10**6, 16]`` statistics. So the dims of an empty
    tensor, the empty ones counted as 1, may span at most ``MAX_EMPTY_SPAN`` elements.
    """
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise InvalidRequestError(f"{what} shape must be a list of non-negative integers")
    if len(value) > limits.max_rank:
        raise InvalidRequestError(
            f"{what} rank {len(value)} exceeds the limit of {limits.max_rank}")
    elements = math.prod(value)
    if elements > limits.max_elements:
        raise InvalidRequestError(
            f"{what} of {elements} elements exceeds the limit of {limits.max_elements}")
    span = work_elements(value)
    if elements == 0 and span > MAX_EMPTY_SPAN:
        raise InvalidRequestError(
            f"an empty {what} whose other dims span {span} elements (its outputs and "
            f"statistics are sized by them); at most {MAX_EMPTY_SPAN}")
    return tuple(value)


def work_elements(shape: Any) -> int:
    """The elements a request's compute and reply scale with: every dim, an empty one as 1."""
    return math.prod(max(int(d), 1) for d in shape)


_NUMBERS = {float, int}


def _check_numbers(data: list) -> None:
    # numpy would quietly read null as NaN, "nan"/"1e9" strings as floats and true as 1,
    # so every leaf is checked to be a JSON number first: one set of types per list, built
    # in C, and a walk down nested lists without recursion (no recursion limit).
    stack = [data]
    while stack:
        items = stack.pop()
        for start in range(0, len(items), _VALUES_PER_STEP):
            part = items[start:start + _VALUES_PER_STEP]
            kinds = set(map(type, part))
            if kinds <= _NUMBERS:
                continue
            if kinds == {list}:
                stack.extend(part)
            elif bool in kinds:
                raise InvalidRequestError("tensor data must be numbers, not booleans")
            else:
                raise InvalidRequestError("tensor data must be a (nested) list of numbers")


def _from_list(data: Any, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    if not isinstance(data, list):
        raise InvalidRequestError("tensor data must be a list of numbers")
    _check_numbers(data)
    try:
        if len(data) <= _VALUES_PER_STEP:
            array = np.array(data, dtype=np.float64)
        else:
            array = np.concatenate([np.array(data[i:i + _VALUES_PER_STEP], dtype=np.float64)
                                    for i in range(0, len(data), _VALUES_PER_STEP)])
    except (ValueError, TypeError, OverflowError):
        raise InvalidRequestError("tensor data must be a (nested) list of numbers") from None
    if array.size != math.prod(shape):
        raise InvalidRequestError(f"tensor data has {array.size} values; shape {list(shape)} "
                                  f"needs {math.prod(shape)}")
    if array.ndim != 1 and array.shape != shape:
        raise InvalidRequestError(f"nested data of shape {list(array.shape)} does not match "
                                  f"shape {list(shape)}")
    if array.size and float(np.abs(array).max()) > _FINITE_MAX[dtype]:
        raise InvalidRequestError(f"a value overflows {dtype}")
    tensor = torch.from_numpy(array.reshape(shape))
    return tensor.to(DTYPES[dtype][0])


def _from_b64(data: Any, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    if not isinstance(data, str):
        raise InvalidRequestError("tensor b64 must be a base64 string")
    # Decoded a slice at a time, so padding is checked here: only at the very end.
    unpadded = data.rstrip("=")
    if "=" in unpadded or len(data) - len(unpadded) > 2:
        raise InvalidRequestError("tensor b64 is not valid base64")
    try:
        raw = bytearray()
        for start in range(0, len(data), _B64_CHARS_PER_STEP):
            raw += binascii.a2b_base64(data[start:start + _B64_CHARS_PER_STEP],
                                       strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("tensor b64 is not valid base64") from None
    return from_bytes(raw, shape, dtype)


def from_bytes(raw: bytearray | memoryview, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A tensor over little-endian bytes, without copying them (``raw`` must be writable)."""
    torch_dtype, wire = DTYPES[dtype]
    expected = math.prod(shape) * wire.itemsize
    if len(raw) != expected:
        raise InvalidRequestError(
            f"tensor bytes are {len(raw)} long; shape {list(shape)} of {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(raw, dtype=torch_dtype).reshape(shape)


def decode_tensor(obj: Any, limits: Limits) -> tuple[torch.Tensor, str]:
    """A tensor object -> (CPU tensor, the encoding it came in: "list" or "b64")."""
    if not isinstance(obj, dict):
        raise InvalidRequestError("tensor must be an object with shape, dtype and data or b64")
    if not set(obj) <= {"shape", "dtype", "data", "b64"}:
        raise InvalidRequestError(
            "unknown tensor field(s): a tensor has shape, dtype, and data or b64")
    dtype = obj.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidRequestError(f"tensor dtype must be one of {', '.join(DTYPES)}")
    shape = check_shape(obj.get("shape"), limits)
    if ("data" in obj) == ("b64" in obj):
        raise InvalidRequestError("tensor needs exactly one of data or b64")
    if "data" in obj:
        return _from_list(obj["data"], shape, dtype), "list"
    return _from_b64(obj["b64"], shape, dtype), "b64"


def check_json_output(values: int, dtype: torch.dtype, limits: Limits, hint: str) -> None:
    """Refuse, before any work, an output of ``values`` to be written as JSON numbers when
    the request did not bring them as JSON numbers itself (whose size max_json_bytes bounds):
    a small binary, base64 or compressed request could otherwise ask for a reply a hundred
    times its size, whose encoding holds the interpreter for seconds. A number takes up to
    about 16 bytes ("-1.2345678e-05,"), 25 in float64."""
    width = 25 if dtype == torch.float64 else 16
    most = limits.max_json_bytes // width
    if values > most:
        raise PayloadTooLargeError(
            f"an output of {values} values is too big for JSON numbers (at most {most}: "
            f"max_json_bytes / {width}); {hint}")


def to_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian row-major bytes (no copy for contiguous CPU tensors)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    # A uint8 view rather than memoryview.cast("B"), which refuses empty tensors.
    return memoryview(tensor.numpy().reshape(-1).view(np.uint8))


def encode_tensor(tensor: torch.Tensor, encoding: str) -> dict[str, Any]:
    """A tensor -> tensor object; ``data`` is flat (numpy, serialized by orjson)."""
    dtype = DTYPE_NAMES.get(tensor.dtype, "float32")
    tensor = tensor.detach().to("cpu")
    if tensor.dtype not in DTYPE_NAMES:
        tensor = tensor.float()
    out: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype}
    if encoding == "b64":
        raw, step = to_bytes(tensor), _B64_CHARS_PER_STEP // 4 * 3
        out["b64"] = "".join(base64.b64encode(raw[i:i + step]).decode("ascii")
                             for i in range(0, len(raw), step))
    else:
        values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        out["data"] = _json_numbers(values.contiguous().numpy().reshape(-1))
    return out


def _json_numbers(values: np.ndarray) -> np.ndarray | orjson.Fragment:
    """A flat array for ``dumps``: as it is when small, else already written a slice at a
    time (see ``_VALUES_PER_STEP``)."""
    if values.size <= _VALUES_PER_STEP:
        return values
    parts = [orjson.dumps(values[i:i + _VALUES_PER_STEP], option=orjson.OPT_SERIALIZE_NUMPY)
             for i in range(0, values.size, _VALUES_PER_STEP)]
    return orjson.Fragment(b"[" + b",".join(part[1:-1] for part in parts) + b"]")


def dumps(obj: Any) -> bytes:
    """JSON bytes; numpy arrays inside are written natively."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
