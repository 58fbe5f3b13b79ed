"""Held-out inpainting grids during training: fixed held-out examples, each at a precision
level (cycling 0, S/2, S), its mask degraded to that level, inpainted by the DDIM sampler
with the EMA weights. Writes `workdir/samples/step_NNNNNNN.png` (rows: input with the
mask outlined | result | predicted mask) and an image in TensorBoard, and returns the
predicted-mask IoU against the exact object mask.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from smartbrush_jax import storage
from smartbrush_jax.compositing import grid_row
from smartbrush_jax.masks import degrade_mask, mask_iou
from smartbrush_jax.models.conditioning import plain_micro, unet_apply
from smartbrush_jax.sampling.sampler import sample
from smartbrush_jax.settings import SamplerConfig


def heldout_levels(n: int, num_levels: int) -> np.ndarray:
    return np.array([(0, num_levels // 2, num_levels)[i % 3] for i in range(n)], np.int32)


def make_sample_fn(models, config, empty_tokens):
    """(params, frozen, batch, levels, rng) -> (pixels [B,H,W,3] in [-1,1], predicted masks,
    user masks, iou [B]), jitted."""
    from smartbrush_jax.train.step import encode, loss_config

    cfg = SamplerConfig(sampler=config.train.sample_sampler, num_steps=config.train.sample_steps,
                        guidance_scale=config.train.sample_guidance)
    loss = loss_config(config)
    ae = models.autoencoder

    @jax.jit
    def run(params, frozen, batch, levels, rng):
        x0, true_mask = encode(models, frozen, batch, rng)
        user = degrade_mask(true_mask, levels, loss.num_levels, **loss.degrade)
        r = batch["mask"].shape[1]
        micro = jnp.asarray(plain_micro(r, r))  # generate the whole crop, as a user would
        cond = models.encoders(frozen, batch["tokens"], micro)
        empty = jnp.broadcast_to(jnp.asarray(empty_tokens, jnp.int32)[None], batch["tokens"].shape)
        uncond = models.encoders(frozen, empty, micro)
        apply = lambda p, x, t, c, s: unet_apply(models.unet, p, x, t, c, s)  # noqa: E731
        latents, pred = sample(apply, params, x0, user, levels, cond, uncond, rng, models.schedule, cfg)
        pixels = ae.decode(frozen.get("vae"), latents)
        return jnp.clip(pixels, -1, 1), pred, user, mask_iou(pred, true_mask)

    return run


class HeldoutGrids:
    """Every `train.sample_every` steps, on process 0 (a no-op elsewhere or when off)."""

    def __init__(self, models, config, empty_tokens, heldout_cfg, workdir):
        from smartbrush_jax.data.pipeline import make_dataset

        self.enabled = bool(config.train.sample_every) and jax.process_index() == 0
        if not self.enabled:
            return
        it = iter(make_dataset(heldout_cfg))
        self.batch = next(it)
        it.close()
        self.levels = heldout_levels(heldout_cfg.batch_size, config.model.num_levels)
        self.fn = make_sample_fn(models, config, empty_tokens)
        self.workdir = workdir
        self.rng = jax.random.PRNGKey(config.train.seed + 99)

    def __call__(self, params, frozen, step, writer) -> float:
        if not self.enabled:
            return float("nan")
        from PIL import Image

        b = {k: jnp.asarray(self.batch[k]) for k in ("image", "mask", "latent_mask", "tokens")}
        pixels, pred, user, iou = jax.device_get(self.fn(jax.device_get(params), jax.device_get(frozen), b,
                                                         jnp.asarray(self.levels), self.rng))
        g = grid(np.asarray(self.batch["image"]), to_uint8(pixels), np.asarray(pred), np.asarray(user))
        path = storage.join(self.workdir, "samples", f"step_{step:07d}.png")
        png = io.BytesIO()
        Image.fromarray(g).save(png, format="PNG")
        storage.write_bytes(path, png.getvalue())
        writer.write_images(step, {"samples": g[None]})
        mean_iou = float(np.mean(iou))
        writer.write_scalars(step, {"heldout_iou": mean_iou})
        logging.info("samples at step %d: %s (held-out predicted-mask IoU %.3f)", step, path, mean_iou)
        return mean_iou


def grid(images: np.ndarray, results: np.ndarray, pred: np.ndarray, user: np.ndarray) -> np.ndarray:
    """uint8 rows of input (mask outline in red) | result | predicted mask; masks upsampled
    (nearest) from the latent grid to the image size."""
    f = images.shape[1] // pred.shape[1]
    up = lambda m: np.repeat(np.repeat(m, f, axis=1), f, axis=2) > 0.5  # noqa: E731
    return np.concatenate([grid_row(img, u, res, p, outline_width=1)
                           for img, u, res, p in zip(images, up(user), results, up(pred))], axis=0)


def to_uint8(pixels) -> np.ndarray:
    return np.clip(np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
