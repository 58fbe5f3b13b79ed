"""A user's image or mask file, read one way by the `inpaint` command and the web app: one
size limit checked from the header before any pixel is decoded, EXIF orientation applied,
and every mode turned into RGB as the data pipeline turns it (`to_rgb`: 16-bit images
scaled, not clipped to white; transparency composited on white). Bad files are an
`InputError` that names the file.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smartbrush_jax.errors import InputError

MAX_PIXELS = 8192 * 8192  # one limit for every reader of images (the data pipeline's default too)


def open_checked(path: str, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path`, opened but not decoded (PIL reads the header only), refused
    over `max_pixels`. `what` names it in messages ("--image photo.jpg", "the mask layer")."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError) as e:
        raise unreadable(what, e) from None
    if im.width * im.height > max_pixels:
        im.close()
        raise InputError(f"{what} is {im.width}x{im.height} pixels, over the limit of {max_pixels / 1e6:.1f} "
                         f"megapixels ({int(max_pixels ** 0.5)} x {int(max_pixels ** 0.5)}): downscale it first")
    return im


def decoded(path: str, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`open_checked`, then decoded and turned upright (EXIF orientation)."""
    im = open_checked(path, what, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
        return ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError,
            ValueError) as e:
        raise unreadable(what, e) from None


def read_rgb(path: str, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H, W, 3] of the image file at `path`."""
    with decoded(path, what, max_pixels) as im:
        return to_rgb(im)


def read_gray(path: str, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Gray uint8 [H, W] of the image file at `path` (a mask: 16-bit scaled like `to_rgb`)."""
    with decoded(path, what, max_pixels) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return to_rgb(im)[..., 0]
        return np.asarray(im.convert("L"))


def unreadable(what: str, e: Exception) -> InputError:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return InputError(f"{what} is too large to decode safely ({e}): downscale it first")
    return InputError(f"{what}: cannot read the image ({type(e).__name__}: {e}); give a PNG, JPEG or WEBP image")


def to_rgb(im: Image.Image, counts: Optional[dict] = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] of any PIL mode: 16-bit and 32-bit gray scaled to 8 bits (by
    65535, or by 255 when the values never pass it), transparency composited on white
    (transparent product shots are common in image-text data). `counts` (a Counter) gets
    a `converted_*` entry for each conversion."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, np.float64)
        top = 65535.0 if mode.startswith("I;16") or np.nanmax(arr, initial=0) > 255 else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        _count(counts, "converted_16bit")
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        _count(counts, "converted_alpha")
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        _count(counts, {"L": "converted_gray", "CMYK": "converted_cmyk"}.get(mode, "converted_other"))
    return np.asarray(im.convert("RGB"))


def _count(counts, key):
    if counts is not None:
        counts[key] += 1
