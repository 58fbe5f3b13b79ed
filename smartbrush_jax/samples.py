"""Periodic inpainting samples on fixed held-out examples during training.

Each held-out object gets a precision level (cycling 0, S/2, S), its mask is degraded to
that level, and the sampler paints the prompt into it with the EMA weights. Returns a
grid (input with the mask outlined | result | predicted mask, one row per example) and
the predicted-mask IoU against the exact object mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smartbrush_jax.diffusion import SamplerConfig, sample
from smartbrush_jax.masks import degrade_mask, mask_iou


def heldout_levels(n: int, num_levels: int) -> np.ndarray:
    return np.array([(0, num_levels // 2, num_levels)[i % 3] for i in range(n)], np.int32)


def make_sample_fn(models, config, empty_tokens):
    """(params, frozen, batch, rng) -> (pixels [B,H,W,3] in [-1,1], predicted masks, user masks, iou [B])."""
    from smartbrush_jax.train_state import encode

    cfg = SamplerConfig(num_steps=config.train.sample_steps, guidance_scale=config.train.sample_guidance)
    levels_n = config.model.num_levels

    @jax.jit
    def run(params, frozen, batch, levels, rng):
        x0, true_mask = encode(models, frozen, batch, rng)
        user = degrade_mask(true_mask, levels, levels_n, config.loss.sigma_scale, config.loss.truncate,
                            config.loss.threshold)
        cond = models.text.apply({"params": frozen["text"]}, batch["tokens"])[0]
        empty = jnp.broadcast_to(jnp.asarray(empty_tokens, jnp.int32)[None], batch["tokens"].shape)
        uncond = models.text.apply({"params": frozen["text"]}, empty)[0]
        apply = lambda p, x, t, c, s: models.unet.apply({"params": p}, x, t, c, s)  # noqa: E731
        latents, pred = sample(apply, params, x0, user, levels, cond, uncond, rng, models.schedule, cfg)
        if models.vae is None:
            pixels = latents
        else:
            pixels = models.vae.apply({"params": frozen["vae"]}, latents / models.scaling_factor,
                                      method=models.vae.decode)
        return jnp.clip(pixels, -1, 1), pred, user, mask_iou(pred, true_mask)

    return run


def grid(images: np.ndarray, results: np.ndarray, pred: np.ndarray, user: np.ndarray) -> np.ndarray:
    """uint8 rows of input (mask outline in red) | result | predicted mask; masks upsampled
    (nearest) to the image size."""
    n, h, w, _ = images.shape
    f = h // pred.shape[1]
    up = lambda m: np.repeat(np.repeat(m, f, axis=1), f, axis=2) > 0.5  # noqa: E731
    pred_px, user_px = up(pred), up(user)
    shown = images.copy()
    border = user_px & ~(np.roll(user_px, 1, 1) & np.roll(user_px, -1, 1) & np.roll(user_px, 1, 2)
                         & np.roll(user_px, -1, 2))
    shown[border] = (255, 0, 0)
    masks = np.repeat((pred_px * 255).astype(np.uint8)[..., None], 3, axis=3)
    rows = np.concatenate([shown, results, masks], axis=2)
    return rows.reshape(n * h, 3 * w, 3)


def to_uint8(pixels) -> np.ndarray:
    return np.clip(np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
