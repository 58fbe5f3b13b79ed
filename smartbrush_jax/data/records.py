"""The record format of prepared datasets and latent caches: one example per ArrayRecord entry.

Version 2 (written now): a `tf.train.Example` protocol buffer with the features of a TFDS
dataset, so a prepared folder is also a TFDS dataset (`data/tfds_info.py` writes its
`dataset_info.json` and `features.json`; `tfds.builder_from_directory(folder)` reads it, no
TensorFlow needed). Our own reader parses the protobuf with the `Example` message that
tensorflow_datasets vendors (no TensorFlow either). Nothing is pickled, so a prepared
dataset from elsewhere is safe to read.

    prepared   id, source ("coco", "openimages", "laion", ...), kind ("seg" | "t2i"),
               label, caption (text); image (encoded JPEG/PNG bytes); mask (PNG of the
               instance mask at the image's size; empty for t2i); box [x0, y0, x1, y1]
               (int; the whole image for t2i)
    cached     id, source, kind, label, caption; mask (PNG at the crop's resolution);
               latent_mean, latent_logvar (float16 bytes), latent_shape [h, w, c],
               latent_dtype; crop (int); box [x0, y0, side]

Version 1 (`b"SBR1"` + uint32 header length + JSON header + blobs) is still read, so
folders prepared before keep working (they are not TFDS datasets; prepare them again to
get that).
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Dict

import numpy as np
from PIL import Image

# Imported here, on the thread that imports this module, never first inside a reader: the
# first import of tensorflow_datasets runs `etils.epy.lazy_imports()`, which swaps
# `builtins.__import__` for the whole process while it lasts. A Grain read thread doing it
# while Orbax restores from gs:// made the restore's own imports fail ("Relative import
# statements not supported (core)"), and a good checkpoint was taken for a damaged one.
from tensorflow_datasets.proto import tf_example_pb2

MAGIC = b"SBR1"  # version 1

# field -> kind: "text" (UTF-8), "bytes", or ("int", shape)
PREPARED_FIELDS = {"id": "text", "source": "text", "kind": "text", "label": "text", "caption": "text",
                   "image": "bytes", "mask": "bytes", "box": ("int", (4,))}
CACHED_FIELDS = {"id": "text", "source": "text", "kind": "text", "label": "text", "caption": "text",
                 "mask": "bytes", "latent_mean": "bytes", "latent_logvar": "bytes", "latent_shape": ("int", (3,)),
                 "latent_dtype": "text", "crop": ("int", ()), "box": ("int", (3,)), "micro": ("int", (6,))}
_SCALARS = {name for schema in (PREPARED_FIELDS, CACHED_FIELDS) for name, kind in schema.items()
            if isinstance(kind, tuple) and kind[1] == ()}
_TEXT = {name for schema in (PREPARED_FIELDS, CACHED_FIELDS) for name, kind in schema.items() if kind == "text"}


class RecordError(ValueError):
    """A record that cannot be parsed."""


def schema_of(fields: Dict[str, Any]) -> Dict[str, Any]:
    return CACHED_FIELDS if "latent_mean" in fields else PREPARED_FIELDS


def pack_record(fields: Dict[str, Any]) -> bytes:
    """A version-2 record of `fields` (every field of its schema is written; a missing one
    is empty or zero, so every record has the features TFDS expects)."""
    schema = schema_of(fields)
    unknown = set(fields) - set(schema)
    if unknown:
        raise ValueError(f"fields {sorted(unknown)} are not in the record schema {sorted(schema)}")
    example = tf_example_pb2.Example()
    for name, kind in schema.items():
        value = fields.get(name)
        feature = example.features.feature[name]
        if kind == "text":
            text = value if isinstance(value, (bytes, bytearray)) else str(value or "").encode()
            feature.bytes_list.value.append(bytes(text))
        elif kind == "bytes":
            feature.bytes_list.value.append(bytes(value or b""))
        else:
            shape = kind[1]
            if shape == ():
                ints = [int(value or 0)]
            else:
                ints = [int(v) for v in (value if value is not None else [0] * shape[0])]
            if shape and len(ints) != shape[0]:
                raise ValueError(f"field {name!r}: {len(ints)} values, expected {shape[0]}")
            feature.int64_list.value.extend(ints)
    return example.SerializeToString(deterministic=True)  # map entries sorted: the same bytes in every process


def unpack_record(data: bytes) -> Dict[str, Any]:
    """The fields of a record (version 2 or 1); RecordError for anything that is not one,
    whoever wrote it. Text that is not UTF-8 comes back as bytes (the caller counts it)."""
    if not isinstance(data, (bytes, bytearray)):
        raise RecordError(f"a record is bytes, got {type(data).__name__}")
    if data[:4] == MAGIC:
        return _unpack_v1(data)
    from google.protobuf.message import DecodeError

    try:
        example = tf_example_pb2.Example.FromString(bytes(data))
    except (DecodeError, ValueError) as e:
        raise RecordError(f"not a SmartBrush record ({e})") from None
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            values = list(feature.bytes_list.value)
            if len(values) != 1:
                raise RecordError(f"record field {name!r}: {len(values)} values, expected 1")
            value = values[0]
            if name in _TEXT:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            out[name] = value
        elif kind == "int64_list":
            ints = [int(v) for v in feature.int64_list.value]
            out[name] = ints[0] if name in _SCALARS and len(ints) == 1 else ints
        elif kind == "float_list":
            out[name] = [float(v) for v in feature.float_list.value]
    if not out:
        raise RecordError("not a SmartBrush record (no feature)")
    return out


def _unpack_v1(data: bytes) -> Dict[str, Any]:
    if len(data) < 8:
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
    """`rec[name]`, which must be a `kind`; RecordError if it is missing, empty (a version-2
    record writes every field, an absent one as empty bytes) or of another type."""
    value = rec.get(name)
    if not isinstance(value, kind) or (kind is bytes and not value):
        what = "missing" if value is None else "empty" if isinstance(value, kind) else type(value).__name__
        raise RecordError(f"record {rec.get('id', '?')!r}: field {name!r} is {what}, expected {kind.__name__}")
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
