"""Local-FID crop geometry: a square crop around each mask's bounding box.

SmartBrush reports Local-FID, the FID over crops around each inpainted mask's bounding box,
next to FID over whole images; the paper does not give the crop rule, so this module fixes one:

1. The mask's bounding box (`box.Box`: x0, y0, x1, y1, ends exclusive; `mask_bbox`).
2. A square with side = max(box height, box width, `min_side`) (min_side 32 px by default, so
   tiny masks still get some context), centred on the box; when the side and the box size differ
   by an odd number, the extra pixel goes above / left of the box (offset rounded down).
3. If that side exceeds the image's short side, the side becomes the short side (the largest
   square that fits), still centred on the box, so the crop may cut an elongated box.
4. The square is shifted, not shrunk, to lie inside the image (`local_crop_box`).
5. The crop is resized to `size` x `size` (299 by default, Inception's input) with antialiased
   bilinear interpolation (`local_crop`), so Inception's own resize is then the identity.

`bbox_mask` fills a mask's bounding box: the paper's bounding-box mask type.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from smartbrush_jax.box import Box

from .errors import MetricsError


def _mask2d(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise MetricsError(f"mask must be [H,W] (or [H,W,1]), got shape {m.shape}")
    return m.astype(bool)


def mask_bbox(mask) -> Box:
    """Bounding box of the mask's nonzero pixels; empty mask -> MetricsError."""
    try:
        return Box.of_mask(_mask2d(mask))
    except ValueError:
        raise MetricsError("empty mask: no bounding box (Local-FID needs a nonempty mask)") from None


def bbox_mask(mask) -> np.ndarray:
    """A bool mask of the same [H,W] that is True over the mask's bounding box."""
    m = _mask2d(mask)
    return mask_bbox(m).mask(m.shape)


def _place(start: int, length: int, side: int, limit: int) -> int:
    """Start of a `side`-long segment centred on [start, start+length), shifted into [0, limit)."""
    begin = start + (length - side) // 2
    return min(max(begin, 0), limit - side)


def local_crop_box(mask, min_side: int = 32) -> Box:
    """The square crop box around the mask's bounding box; see the module docstring."""
    m = _mask2d(mask)
    height, width = m.shape
    b = mask_bbox(m)
    side = min(max(b.height, b.width, min_side), height, width)
    top, left = _place(b.y0, b.height, side, height), _place(b.x0, b.width, side, width)
    return Box(left, top, left + side, top + side)


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3], bilinear with antialiasing when shrinking, rounded."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def local_crop(image: np.ndarray, mask, size: int = 299, min_side: int = 32) -> np.ndarray:
    """The Local-FID crop of `image` (uint8 [H,W,3]) around `mask` ([H,W]), resized to uint8 [size,size,3]."""
    image = np.asarray(image)
    m = _mask2d(mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise MetricsError(f"image must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    if image.shape[:2] != m.shape:
        raise MetricsError(f"image {image.shape[:2]} and mask {m.shape} sizes differ")
    return resize_uint8(image[local_crop_box(m, min_side).slices()], size)
