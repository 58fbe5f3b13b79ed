"""SmartBrush's mask-precision degrader and the DICE loss, as pure jittable functions.

`degrade_mask(m, s, S)` turns an exact object mask into the coarse mask a user would
draw at precision level `s`: level 0 is the mask itself, level S its bounding box, and
between them a Gaussian blur whose width grows with the level relative to the object's
size, binarised at `threshold`. With the default threshold 0 the blurred support is a
dilation of the mask, clipped to the bounding box, so masks only grow with the level:
`m <= m_s <= bbox(m)` and area(m_s) is non-decreasing in s.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from smartbrush_jax.settings import DEGRADE


def degrade_mask(masks: jax.Array, levels: jax.Array, num_levels: int, sigma_scale: float = DEGRADE["sigma_scale"],
                 truncate: float = DEGRADE["truncate"], threshold: float = DEGRADE["threshold"]) -> jax.Array:
    """Coarsen each mask to its own precision level.

    masks: [B, H, W] (bool or float in {0, 1}); levels: [B] int in [0, num_levels].
    Level s blurs with sigma = (s / S) * sigma_scale * object_size, where object_size is
    the longer side of the object's bounding box, the kernel truncated at `truncate`
    sigmas; the blur is row-normalised and binarised at `> threshold`, then clipped to the
    bounding box and united with the mask. Returns [B, H, W] float32 in {0, 1}. Empty masks
    stay empty, full masks stay full; no NaN for any input. Runs under jit on device.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    m = (jnp.asarray(masks) > 0.5).astype(jnp.float32)
    levels = jnp.clip(jnp.asarray(levels, jnp.int32), 0, num_levels)
    _, h, w = m.shape
    box, size = bounding_box(m)
    sigma = levels.astype(jnp.float32) / num_levels * sigma_scale * size  # [B]
    rows = _gaussian_matrix(h, sigma, truncate)  # [B, H, H]
    cols = _gaussian_matrix(w, sigma, truncate)  # [B, W, W]
    blurred = jnp.einsum("bij,bjk,blk->bil", rows, m, cols, precision=jax.lax.Precision.HIGHEST)
    coarse = jnp.maximum((blurred > threshold).astype(jnp.float32) * box, m)
    out = jnp.where((levels == 0)[:, None, None], m, coarse)
    return jnp.where((levels == num_levels)[:, None, None], box, out)


def bounding_box(masks: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """masks [B, H, W] in {0, 1} -> (box [B, H, W] float32 filled bounding box, size [B]
    float32 = longer side of the box in pixels; 0 for an empty mask)."""
    rows = masks.max(axis=2) > 0  # [B, H]
    cols = masks.max(axis=1) > 0  # [B, W]
    y0, y1 = _first_last(rows)
    x0, x1 = _first_last(cols)
    ys = jnp.arange(masks.shape[1])[None]
    xs = jnp.arange(masks.shape[2])[None]
    in_rows = (ys >= y0[:, None]) & (ys <= y1[:, None])
    in_cols = (xs >= x0[:, None]) & (xs <= x1[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)
    size = jnp.maximum(y1 - y0 + 1, x1 - x0 + 1).astype(jnp.float32)
    return box, jnp.where(rows.any(axis=1), size, 0.0)


def _first_last(flags: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Index of the first and last True along axis 1 ([B, N] bool); (0, -1) when none."""
    n = flags.shape[1]
    any_ = flags.any(axis=1)
    first = jnp.argmax(flags, axis=1)
    last = n - 1 - jnp.argmax(flags[:, ::-1], axis=1)
    return jnp.where(any_, first, 0), jnp.where(any_, last, -1)


def _gaussian_matrix(n: int, sigma: jax.Array, truncate: float) -> jax.Array:
    """[B, n, n] row-normalised Gaussian blur matrices, one per sigma in [B]; identity
    where sigma is 0. Blurring a mask along an axis is a product with this matrix."""
    d = jnp.arange(n, dtype=jnp.float32)
    dist = jnp.abs(d[:, None] - d[None, :])[None]  # [1, n, n]
    s = jnp.maximum(sigma, 1e-6)[:, None, None]
    radius = jnp.ceil(truncate * sigma)[:, None, None]
    k = jnp.where(dist <= radius, jnp.exp(-0.5 * (dist / s) ** 2), 0.0)
    k = jnp.where(dist == 0, 1.0, k)  # the centre tap, also when exp underflows
    return k / k.sum(axis=2, keepdims=True)


def dice_loss(probabilities: jax.Array, target: jax.Array, eps: float = 1e-6) -> Tuple[jax.Array, jax.Array]:
    """Soft DICE loss on probabilities (never thresholded: the gradient must flow).

    probabilities, target: [B, ...] in [0, 1]. Per example
    `1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`; 0 for identical binary masks, and
    0 (not NaN) when both are empty. Returns (per_example [B], mean scalar).
    """
    p = probabilities.reshape(probabilities.shape[0], -1).astype(jnp.float32)
    t = target.reshape(target.shape[0], -1).astype(jnp.float32)
    inter = jnp.sum(p * t, axis=1)
    per_example = 1.0 - (2.0 * inter + eps) / (p.sum(axis=1) + t.sum(axis=1) + eps)
    return per_example, per_example.mean()


def mask_iou(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Intersection over union of binary masks [B, ...] -> [B]; 1 when both are empty."""
    p = pred.reshape(pred.shape[0], -1) > 0.5
    t = target.reshape(target.shape[0], -1) > 0.5
    inter = jnp.sum(p & t, axis=1)
    union = jnp.sum(p | t, axis=1)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def dilate(masks: jax.Array, radius: int) -> jax.Array:
    """Binary dilation of [B, H, W] masks by a (2r+1)^2 square (max-pool, stride 1)."""
    if radius <= 0:
        return masks
    return jax.lax.reduce_window(masks, -jnp.inf, jax.lax.max, (1, 2 * radius + 1, 2 * radius + 1), (1, 1, 1),
                                 "SAME")
