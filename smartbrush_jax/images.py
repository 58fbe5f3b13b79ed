"""A user's image or mask file, read one way by the `inpaint` command and the web app: one
size limit checked from the header before any pixel is decoded, EXIF orientation applied,
and every mode turned into RGB as the data pipeline turns it (`to_rgb`: 16-bit images
scaled, not clipped to white; transparency composited on white). Bad files are an
`InputError` that names the file. Only a regular file is opened (a named pipe or a device
would block or never end), and a PNG whose pixel data stops short is refused, not filled
(`check_complete`).
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zlib
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from smartbrush_jax.errors import InputError

MAX_PIXELS = 8192 * 8192  # one limit for every reader of images (the data pipeline's default too)


def open_checked(path: str, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path`, opened but not decoded (PIL reads the header only), refused
    over `max_pixels`. `what` names it in messages ("--image photo.jpg", "the mask layer")."""
    check_regular(path, what)
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


def check_regular(path: str, what: str) -> None:
    """InputError unless `path` is a regular file (or a link to one): reading a named pipe
    waits for a writer for ever, and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except OSError as e:
        raise InputError(f"{what}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} is a folder, not an image file")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise InputError(f"{what} is {kind}, not a regular file: save the image to a file and give its path")


def decoded(path: str, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`open_checked`, then decoded and turned upright (EXIF orientation); a file whose data
    stops short is refused even where a library in this process asked PIL to fill it
    (`ImageFile.LOAD_TRUNCATED_IMAGES`, which tensorflow_datasets sets)."""
    im = open_checked(path, what, max_pixels)
    try:
        check_complete(path, what)
        tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
        return ImageOps.exif_transpose(im)
    except InputError:
        im.close()
        raise
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
    if "truncated" in str(e) or isinstance(e, (EOFError, zlib.error, struct.error)):
        return InputError(f"{what} is truncated or corrupt ({type(e).__name__}: {e}): give the whole file")
    return InputError(f"{what}: cannot read the image ({type(e).__name__}: {e}); give a PNG, JPEG or WEBP image")


_PNG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_size(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes of a PNG's decompressed image data: each row (of each Adam7 pass) is a filter
    byte and its packed samples."""
    bits = _CHANNELS.get(colour, 4) * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-max(width - x0, 0) // dx), -(-max(height - y0, 0) // dy)
        if w and h:
            total += h * (1 + -(-w * bits // 8))
    return total


def check_complete(path: str, what: str) -> None:
    """InputError when the PNG at `path` holds less image data than its header promises (a
    download or copy cut short, re-wrapped or not): PIL stops at the end of the zlib stream
    without a word and leaves the missing rows black. Not a PNG: nothing to check here (PIL
    itself refuses a JPEG or WEBP cut short). Reads the file once, in 64 KiB pieces."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG:
            return
        need, got, inflate = None, 0, zlib.decompressobj()
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR":
                w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
                need = png_data_size(w, h, depth, colour, bool(interlace))
                f.seek(length - 13 + 4, os.SEEK_CUR)
            elif kind == b"IDAT":
                left = length
                while left:
                    data = f.read(min(left, 1 << 16))
                    if not data:
                        break
                    left -= len(data)
                    try:
                        while data and not inflate.eof:
                            got += len(inflate.decompress(data, 1 << 20))
                            data = inflate.unconsumed_tail
                    except zlib.error as e:
                        raise InputError(f"{what} is truncated or corrupt (its pixel data: {e}): give the whole "
                                         "file") from None
                f.seek(4, os.SEEK_CUR)  # CRC (PIL checks it)
            elif kind == b"IEND":
                break
            else:
                f.seek(length + 4, os.SEEK_CUR)
    if need is not None and got < need:
        raise InputError(f"{what} is truncated or corrupt: its pixel data stops at {got} of the {need} bytes its "
                         "header promises: give the whole file")


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
