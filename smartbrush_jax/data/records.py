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
    if len(data) < 8 or data[:4] != MAGIC:
        raise RecordError("not a SmartBrush record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"corrupt record header ({e})") from None
    body = data[8 + n:]
    out = {}
    for k, spec in header.items():
        if "value" in spec:
            out[k] = spec["value"]
        else:
            start, length = spec["offset"], spec["length"]
            if start + length > len(body):
                raise RecordError(f"record field {k!r} is truncated")
            out[k] = body[start:start + length]
    return out


def encode_mask(mask: np.ndarray) -> bytes:
    """Bool [H, W] -> 1-bit PNG bytes (lossless, small)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127
