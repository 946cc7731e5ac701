"""HTTP content codings for bodies: gzip and deflate, both ways.

Decompression is linear in the body and bounded in its output: the body is fed to zlib in
fixed-size slices (handing zlib the whole remainder for each gzip member would copy it
again every time: quadratic), the number of members is capped, and inflating stops one
byte past the limit.
"""

from __future__ import annotations

import zlib

from ..core.errors import (
    InvalidRequestError,
    MalformedRequestError,
    PayloadTooLargeError,
    shown,
)

# NOTE: "deflate" is zlib-wrapped (RFC 1950), as in HTTP and tritonclient, not raw deflate.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
ENCODINGS = tuple(_WBITS)
# Float tensors barely compress; a fast level keeps large responses from stalling.
COMPRESS_LEVEL = 1
_SLICE = 1 << 16  # bytes of compressed input handed to zlib at a time
# gzip allows several members back to back; clients send one. Each costs a fresh inflater,
# so a body of thousands of empty members is refused rather than worked through.
MAX_MEMBERS = 64
SAMPLE_BYTES = 64 * 1024  # what a reply is judged on
MIN_SAVING = 0.15  # the share of bytes compression must save to be used


def decompress(body: bytearray, encoding: str | None, limit: int) -> bytearray:
    """The body with its ``Content-Encoding`` undone; ``PayloadTooLargeError`` past
    ``limit`` bytes once inflated, so a small compressed body cannot expand without bound."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise InvalidRequestError(
            f"unsupported Content-Encoding '{shown(name)}'; use gzip or deflate")
    view = memoryview(body)
    out = bytearray()
    inflater = zlib.decompressobj(wbits)
    offset, members = 0, 1
    try:
        while True:
            if inflater.eof:  # a stream ended: done, or a next gzip member follows
                rest = len(inflater.unused_data)
                if not rest and offset >= len(view):
                    return out
                members += 1
                if wbits != _WBITS["gzip"] or members > MAX_MEMBERS:
                    raise MalformedRequestError(
                        f"unexpected bytes after the {name} stream" if wbits != _WBITS["gzip"]
                        else f"more than {MAX_MEMBERS} gzip members in one body")
                offset -= rest
                inflater = zlib.decompressobj(wbits)
            if offset >= len(view):
                raise MalformedRequestError(f"{name} request body is truncated")
            chunk = view[offset:offset + _SLICE]
            offset += len(chunk)
            # Capped one byte past the limit: input left over then means too large.
            out += inflater.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                raise PayloadTooLargeError(
                    f"decompressed request body exceeds the limit of {limit} bytes")
    except zlib.error as exc:
        raise MalformedRequestError(f"request body is not valid {name}: {exc}") from None


def response_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate when the client's ``Accept-Encoding`` names it (gzip first), else
    None: nothing is compressed unless asked for by name."""
    offered = set()
    for item in (accept_encoding or "").lower().split(","):
        token, _, params = item.partition(";")
        params = params.strip()
        try:
            weight = float(params[2:]) if params.startswith("q=") else 1.0
        except ValueError:
            weight = 0.0
        if weight > 0:
            offered.add(token.strip())
    return next((e for e in ENCODINGS if e in offered), None)


def pays(parts: list[bytes | memoryview]) -> bool:
    """Whether compressing a reply is worth its time: ``Accept-Encoding`` allows it, it does
    not demand it. A fast-level trial on a sample (the start of the largest part) must save
    ``MIN_SAVING``: JSON does, float tensors rarely do (gzip saves about 7% on normal noise,
    for ten times the time of sending it)."""
    largest = memoryview(max(parts, key=len)).cast("B")
    sample = largest[:SAMPLE_BYTES]
    if not sample:
        return False
    return len(zlib.compress(sample, COMPRESS_LEVEL)) <= len(sample) * (1 - MIN_SAVING)


def compress_if_it_pays(parts: list[bytes | memoryview], encoding: str) -> bytes | None:
    """``compress(parts, encoding)``, or None when the reply goes better plain (``pays``)."""
    return compress(parts, encoding) if pays(parts) else None


def compress(parts: list[bytes | memoryview], encoding: str) -> bytes:
    """One compressed stream over the parts, without joining them first."""
    deflater = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, _WBITS[encoding])
    return b"".join([*(deflater.compress(p) for p in parts), deflater.flush()])
