"""Decoding and checking of one example: what is bad is skipped and counted by reason.

Every check used by `prepare` (offline) and the Grain pipeline (online) lives here, so
both count the same reasons:

    corrupt_image      cannot be decoded, or is truncated
    too_many_pixels    over the pixel limit (decompression bomb guard)
    missing_file       the image or mask file named by the annotation is absent
    empty_mask         the instance mask has no pixel
    tiny_mask          mask area below `min_mask_area` (fraction of the image)
    mask_outside       mask/box outside the image, or of another size than the image
    bad_caption        caption bytes are not valid UTF-8 (or a caption line that is not JSON)
    corrupt_record     a record or annotation that cannot be parsed or decoded

and, in `prepare` only (a whole sample or source, never seen by the training pipeline):

    no_caption         an image-text sample without any caption
    oversized_file     a webdataset member over the size bound (not read)
    corrupt_shard      a webdataset shard that cannot be opened or ends early
    unreadable_source  a source that failed mid-way (what was read before is kept)
    bad_polygon        a COCO polygon or RLE that pycocotools cannot take safely
    bad_coco_entry     a COCO image, category or annotation with a field of the wrong type
                       (an id that is a list or an object, `categories` a number, a `bbox`
                       that is text, an `iscrowd` that is a list: `coco_entries.py`)

Convertible images are kept and counted under `converted_*` (grayscale, CMYK, RGBA,
16-bit, EXIF-rotated): they are not errors.
"""

from __future__ import annotations

import collections
import io
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from smartbrush_jax.images import MAX_PIXELS, to_rgb

SKIP_REASONS = ("corrupt_image", "too_many_pixels", "missing_file", "empty_mask", "tiny_mask", "mask_outside",
                "bad_caption", "corrupt_record")  # the pipeline's per-batch `skips` vector, in this order
SOURCE_REASONS = ("no_caption", "oversized_file", "corrupt_shard", "unreadable_source", "bad_polygon",
                  "bad_coco_entry")
ALL_REASONS = SKIP_REASONS + SOURCE_REASONS
DEFAULT_MAX_PIXELS = MAX_PIXELS


class Skip(Exception):
    """This example is bad; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in ALL_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Counter(collections.Counter):
    """Counts by reason, with `skipped()` = the total of skip reasons."""

    def skipped(self) -> int:
        return sum(v for k, v in self.items() if k in ALL_REASONS)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 counts: Optional[Counter] = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3], EXIF orientation applied.

    Raises Skip("corrupt_image") for undecodable or truncated data and
    Skip("too_many_pixels") over `max_pixels` (checked from the header, before decoding).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard fires at open() past 2x its limit
        raise Skip("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for garbage
        raise Skip("corrupt_image", str(e)) from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Skip("too_many_pixels", f"{w}x{h}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        except Image.DecompressionBombWarning as e:
            raise Skip("too_many_pixels", str(e)) from None
        except Exception as e:
            raise Skip("corrupt_image", str(e)) from None
        if counts is not None and im.getexif().get(0x0112, 1) != 1:
            counts["converted_exif"] += 1
        im = ImageOps.exif_transpose(im)
        return to_rgb(im, counts)


def check_caption(caption) -> str:
    """str or bytes -> str, whitespace collapsed; Skip("bad_caption") for bytes that are not
    UTF-8 and for anything that is not text (a JSON null, number, list or object would
    otherwise train as the words "None", "5", "[1, 2]")."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("bad_caption", str(e)) from None
    if not isinstance(caption, str):
        raise Skip("bad_caption", f"a caption is text, not {type(caption).__name__} ({str(caption)[:40]})")
    return " ".join(caption.split())


def check_mask(mask: np.ndarray, image_shape: Tuple[int, int], min_mask_area: float) -> np.ndarray:
    """Bool [H, W] instance mask at the image's size with at least `min_mask_area` of it."""
    if mask.shape != tuple(image_shape):
        raise Skip("mask_outside", f"mask {mask.shape} vs image {tuple(image_shape)}")
    area = int(mask.sum())
    if area == 0:
        raise Skip("empty_mask")
    if area < min_mask_area * mask.size:
        raise Skip("tiny_mask", f"{area / mask.size:.5f} of the image")
    return mask


def check_box(box, width: int, height: int) -> None:
    """A pixel box [x0, y0, x1, y1] must overlap the image."""
    x0, y0, x1, y1 = box
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height or x1 <= x0 or y1 <= y0:
        raise Skip("mask_outside", f"box {box} outside {width}x{height}")


def merge(total: Dict[str, int], part: Dict[str, int]) -> Dict[str, int]:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v
    return total
