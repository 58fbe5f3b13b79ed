"""SmartBrush sampling: classifier-free guidance, precision levels, and the background kept
clean outside the (predicted) object mask, with any sampler of `solvers.py` (DDIM,
DPM-Solver++ 2M, Euler, Euler ancestral). Shapes as in `diffusion.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from smartbrush_jax.diffusion import ApplyFn, NoiseSchedule
from smartbrush_jax.masks import dilate
from smartbrush_jax.sampling import solvers
from smartbrush_jax.settings import SamplerConfig


def plan_for(schedule: NoiseSchedule, cfg: SamplerConfig) -> solvers.Plan:
    """The steps `cfg` asks for on `schedule` (its spacing and offset, as its diffusers
    scheduler config gives them)."""
    final = None if not schedule.set_alpha_to_one else 1.0
    return solvers.plan(cfg.sampler, schedule.alphas_cumprod(), cfg.num_steps, spacing=schedule.timestep_spacing,
                        steps_offset=schedule.steps_offset, karras=cfg.karras, eta=cfg.eta,
                        final_alpha_cumprod=final)


def sample(apply_fn: ApplyFn, params: Any, x0: jax.Array, mask: jax.Array, levels: jax.Array, cond: jax.Array,
           uncond: jax.Array, rng: jax.Array, schedule: NoiseSchedule = NoiseSchedule(),
           cfg: SamplerConfig = SamplerConfig(), progress: Optional[Callable[[int], None]] = None,
           init_noise: Optional[jax.Array] = None):
    """SmartBrush sampling with classifier-free guidance and background preservation.

    x0: [B,h,w,C] scaled latents of the input image; mask: [B,h,w] the user's mask on the
    latent grid; levels: [B]; cond/uncond: [B,T,D] (or SDXL's dict of them,
    `models.conditioning`). Conditional and unconditional passes run as one batched U-Net
    call; `cfg.sampler` steps the latent (`solvers.py`), in the schedule's parameterisation
    (`schedule.prediction_type`: guidance is applied to eps or v, then the clean estimate is
    taken). Outside the region `M` the clean latent is restored after every step; `M` is the
    user mask for the first `mask_warmup` of the steps, then the predicted mask (sigmoid >
    threshold, dilated, within the user mask; the user mask again if the prediction covers
    less than `min_predicted_fraction` of it). `progress(i)` is called after step i (host
    callback). `init_noise` ([B,h,w,C]) replaces the initial noise drawn from `rng` (to
    compare with another implementation). Returns (latents [B,h,w,C], predicted mask
    [B,h,w] float in {0,1} within the user mask, from the last step).
    """
    steps = plan_for(schedule, cfg)
    arr = solvers.device_arrays(steps)
    kind = schedule.prediction_type
    warmup = int(round(cfg.mask_warmup * cfg.num_steps))
    m = (mask > 0.5).astype(x0.dtype)
    b, c = x0.shape[0], x0.shape[-1]
    k0, k_loop = jax.random.split(rng)
    noise0 = jax.random.normal(k0, x0.shape, x0.dtype) if init_noise is None else init_noise.astype(x0.dtype)
    x = steps.init_scale * noise0 * m[..., None] + x0 * (1.0 - m[..., None])
    context = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    unet_in_mask = m[..., None]

    def body(i, carry):
        x, x0_prev, pred_mask = carry
        tt = jnp.full((2 * b,), arr["t"][i], jnp.float32)
        inp = jnp.concatenate([x, unet_in_mask], axis=-1)
        out = apply_fn(params, jnp.concatenate([inp, inp], axis=0), tt, context,
                       jnp.concatenate([levels, levels], axis=0)).astype(x0.dtype)
        guided = out[b:, ..., :c] + cfg.guidance_scale * (out[:b, ..., :c] - out[b:, ..., :c])
        x0_hat = solvers.clean_estimate(guided, x, arr["alpha"][i], arr["sigma"][i], kind)
        noise = jax.random.normal(jax.random.fold_in(k_loop, i), x.shape, x.dtype) if steps.noisy else None
        x = solvers.update(arr, i, x, x0_hat, x0_prev, noise)
        predicted = predicted_region(out[:b, ..., c], m, cfg)
        region = m if not cfg.use_predicted_mask else jnp.where(i < warmup, m, predicted)
        x = x * region[..., None] + x0 * (1.0 - region[..., None])
        if progress is not None:
            jax.debug.callback(progress, i)
        return x, x0_hat, predicted

    x, _, pred = jax.lax.fori_loop(0, cfg.num_steps, body, (x, jnp.zeros_like(x), m))
    return x, pred


def predicted_region(mask_logit: jax.Array, user_mask: jax.Array, cfg: SamplerConfig) -> jax.Array:
    """Binarise, dilate and clip the predicted object mask to the user's mask ([B,h,w]);
    fall back to the user mask where the prediction is (nearly) empty. A dilation past the
    grid's longest side reaches every cell from any cell, so it is that side: the same mask
    (a radius of 10**9 was a window XLA would take for ever over)."""
    pred = (jax.nn.sigmoid(mask_logit.astype(jnp.float32)) > cfg.mask_threshold).astype(user_mask.dtype)
    pred = dilate(pred, min(cfg.mask_dilate, max(user_mask.shape[1:]))) * user_mask
    share = pred.sum(axis=(1, 2)) / jnp.maximum(user_mask.sum(axis=(1, 2)), 1.0)
    return jnp.where((share < cfg.min_predicted_fraction)[:, None, None], user_mask, pred)
