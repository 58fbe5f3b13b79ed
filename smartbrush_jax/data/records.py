"""The record format of prepared datasets: one example per ArrayRecord entry.

A record is `b"SBR1" + uint32 header length + JSON header + blobs`: the header holds
the plain fields and the offsets of the byte fields (the encoded image, the mask PNG).
Nothing is pickled, so a prepared dataset from elsewhere is safe to read.

Fields: `id` (str), `source` (str: "coco", "openimages", "laion", ...), `kind` ("seg" or
"t2i"), `label` (str), `caption` (str), `image` (encoded JPEG/PNG bytes), `mask` (PNG
bytes of the instance mask at the image's size, absent for t2i), `box` ([x0, y0, x1, y1]).
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Dict

import numpy as np
from PIL import Image

MAGIC = b"SBR1"


class RecordError(ValueError):
    """A record that cannot be parsed."""


def pack_record(fields: Dict[str, Any]) -> bytes:
    header, blobs, offset = {}, [], 0
    for k, v in fields.items():
        if isinstance(v, (bytes, bytearray)):
            header[k] = {"offset": offset, "length": len(v)}
            blobs.append(bytes(v))
            offset += len(v)
        else:
            header[k] = {"value": v}
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def unpack_record(data: bytes) -> Dict[str, Any]:
    """The fields of a record; RecordError for anything that is not one, whoever wrote it."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8 or data[:4] != MAGIC:
        raise RecordError("not a SmartBrush record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    if 8 + n > len(data):
        raise RecordError(f"record header of {n} bytes is truncated")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"corrupt record header ({e})") from None
    if not isinstance(header, dict):
        raise RecordError(f"record header is a JSON {type(header).__name__}, not an object")
    body = data[8 + n:]
    out = {}
    for k, spec in header.items():
        if not isinstance(spec, dict):
            raise RecordError(f"record field {k!r}: spec {spec!r} is not an object")
        if "value" in spec:
            out[k] = spec["value"]
            continue
        start, length = spec.get("offset"), spec.get("length")
        if not (isinstance(start, int) and isinstance(length, int)) or start < 0 or length < 0:
            raise RecordError(f"record field {k!r}: needs a value or integer offset and length, got {spec!r}")
        if start + length > len(body):
            raise RecordError(f"record field {k!r} is truncated")
        out[k] = body[start:start + length]
    return out


def field(rec: Dict[str, Any], name: str, kind: type = bytes):
    """`rec[name]`, which must be a `kind`; RecordError if it is missing or of another type."""
    value = rec.get(name)
    if not isinstance(value, kind):
        raise RecordError(f"record {rec.get('id', '?')!r}: field {name!r} is "
                          f"{'missing' if value is None else type(value).__name__}, expected {kind.__name__}")
    return value


def encode_mask(mask: np.ndarray) -> bytes:
    """Bool [H, W] -> 1-bit PNG bytes (lossless, small)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> bool [H, W]; RecordError for bytes that are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L")) > 127
    except Exception as e:  # PIL raises many types for garbage (UnidentifiedImageError, OSError, ...)
        raise RecordError(f"mask: not a decodable image ({type(e).__name__}: {e})") from None
