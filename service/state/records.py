"""Bytes on disk for the state dir: checksummed frames around records of metadata + tensors.

A frame is ``MAGIC (4) | length (u32 LE) | crc32 (u32 LE) | payload``; the CRC covers the
length and the payload, so a torn or flipped frame cannot pass for a good one. A payload is
``header length (u32 LE) | header (JSON) | tensor bytes``, the header holding the record's
metadata and, per tensor, its name, dtype, shape and byte count; tensors follow in that
order, little-endian, row-major. Journal records and snapshots share both layers.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import orjson
import torch

MAGIC = b"NCR1"
_FRAME = struct.Struct("<4sII")
_U32 = struct.Struct("<I")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
)}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}
_NOT_NUMPY = {torch.bfloat16}


class StateFileError(Exception):
    """A file in the state dir cannot be trusted; the message names it and the reason."""


# --- frames ---------------------------------------------------------------------------------

def frame(payload: bytes) -> bytes:
    length = _U32.pack(len(payload))
    return MAGIC + length + _U32.pack(zlib.crc32(payload, zlib.crc32(length))) + payload


def _frame_at(data: bytes | memoryview, offset: int) -> tuple[bytes | None, str]:
    """(payload, "") for a good frame at ``offset``, else (None, why it is not one)."""
    if len(data) - offset < _FRAME.size:
        return None, "truncated header"
    magic, length, crc = _FRAME.unpack_from(data, offset)
    if magic != MAGIC:
        return None, "bad magic"
    start = offset + _FRAME.size
    if start + length > len(data):
        return None, "truncated payload"
    payload = bytes(data[start:start + length])
    if zlib.crc32(payload, zlib.crc32(_U32.pack(length))) != crc:
        return None, "checksum mismatch"
    return payload, ""


def read_frames(data: bytes, source: str) -> tuple[list[bytes], int]:
    """Every good frame in ``data`` and where the good part ends.

    A bad frame with no good frame anywhere after it is a torn tail (a crash mid-append):
    it and what follows are left out and ``end`` says where to cut. A bad frame that good
    ones follow is corruption of acknowledged data and raises ``StateFileError``.
    """
    payloads: list[bytes] = []
    offset = 0
    while offset < len(data):
        payload, why = _frame_at(data, offset)
        if payload is None:
            later = _next_good_frame(data, offset + 1)
            if later is not None:
                raise StateFileError(
                    f"{source}: record at byte {offset} is corrupt ({why}) and valid "
                    f"records follow it at byte {later}; refusing to guess")
            return payloads, offset
        payloads.append(payload)
        offset += _FRAME.size + len(payload)
    return payloads, offset


def _next_good_frame(data: bytes, offset: int) -> int | None:
    while (offset := data.find(MAGIC, offset)) != -1:
        if _frame_at(data, offset)[0] is not None:
            return offset
        offset += 1
    return None


# --- payloads -------------------------------------------------------------------------------

def encode_record(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """``meta`` (JSON-ready) and named tensors as one payload."""
    specs, blobs = [], []
    for name, tensor in (tensors or {}).items():
        t = tensor if tensor.is_cpu and not tensor.requires_grad else tensor.detach().cpu()
        # numpy writes the bytes in C order whatever the strides (one call per tensor: the
        # journal encodes a record per train step); it has no bfloat16, so that goes as bytes.
        raw = (t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.dtype in _NOT_NUMPY
               else t.numpy()).tobytes()
        kind = _DTYPE_NAMES.get(t.dtype) or str(t.dtype).removeprefix("torch.")
        specs.append([name, kind, list(t.shape), len(raw)])
        blobs.append(raw)
    header = orjson.dumps({"meta": meta, "tensors": specs})
    return b"".join([_U32.pack(len(header)), header, *blobs])


def decode_record(payload: bytes, source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The inverse of ``encode_record``; ``StateFileError`` if the payload is malformed."""
    try:
        (size,) = _U32.unpack_from(payload, 0)
        header = orjson.loads(payload[4:4 + size])
        offset = 4 + size
        tensors = {}
        for name, dtype, shape, nbytes in header["tensors"]:
            kind = _DTYPES[dtype]
            if nbytes != math.prod(shape) * kind.itemsize or offset + nbytes > len(payload):
                raise ValueError(f"tensor {name!r} has the wrong byte count")
            raw = bytearray(payload[offset:offset + nbytes])
            flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0)
            tensors[name] = flat.view(kind).reshape(shape) if nbytes else torch.empty(
                shape, dtype=kind)
            offset += nbytes
        return header["meta"], tensors
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{source}: malformed record ({exc})") from None
