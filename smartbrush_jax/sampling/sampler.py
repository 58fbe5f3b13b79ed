"""SmartBrush DDIM sampling: classifier-free guidance, precision levels, and the background
kept clean outside the (predicted) object mask. Shapes as in `diffusion.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from smartbrush_jax.diffusion import ApplyFn, NoiseSchedule
from smartbrush_jax.masks import dilate
from smartbrush_jax.settings import SamplerConfig


# ---------------------------------------------------------------------------- DDIM
def ddim_step(eps: jax.Array, t: jax.Array, t_prev: jax.Array, x_t: jax.Array, alphas_cumprod: jax.Array,
              final_alpha_cumprod: jax.Array, eta: float = 0.0, noise: Optional[jax.Array] = None) -> jax.Array:
    """One DDIM update x_t -> x_{t_prev} for an epsilon-predicting model (diffusers'
    `DDIMScheduler.step` without sample clipping). `t_prev < 0` uses `final_alpha_cumprod`."""
    a_t = alphas_cumprod[t]
    a_prev = jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], final_alpha_cumprod)
    x0_hat = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std ** 2, 0.0)) * eps
    x_prev = jnp.sqrt(a_prev) * x0_hat + direction
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def sample(apply_fn: ApplyFn, params: Any, x0: jax.Array, mask: jax.Array, levels: jax.Array, cond: jax.Array,
           uncond: jax.Array, rng: jax.Array, schedule: NoiseSchedule = NoiseSchedule(),
           cfg: SamplerConfig = SamplerConfig(), progress: Optional[Callable[[int], None]] = None,
           init_noise: Optional[jax.Array] = None):
    """SmartBrush DDIM sampling with classifier-free guidance and background preservation.

    x0: [B,h,w,C] scaled latents of the input image; mask: [B,h,w] the user's mask on the
    latent grid; levels: [B]; cond/uncond: [B,T,D]. Conditional and unconditional passes
    run as one batched U-Net call. Outside the region `M` the clean latent is restored
    after every step; `M` is the user mask for the first `mask_warmup` of the steps, then
    the predicted mask (sigmoid > threshold, dilated, within the user mask; the user mask
    again if the prediction covers less than `min_predicted_fraction` of it).
    `progress(i)` is called after step i (host callback). `init_noise` ([B,h,w,C]) replaces
    the initial noise drawn from `rng` (to compare with another implementation). Returns (latents [B,h,w,C],
    predicted mask [B,h,w] float in {0,1} within the user mask, from the last step).
    """
    acp = jnp.asarray(schedule.alphas_cumprod())
    final = acp[0] if not schedule.set_alpha_to_one else jnp.float32(1.0)
    timesteps = jnp.asarray(schedule.ddim_timesteps(cfg.num_steps))
    ratio = schedule.num_train_timesteps // cfg.num_steps
    warmup = int(round(cfg.mask_warmup * cfg.num_steps))
    m = (mask > 0.5).astype(x0.dtype)
    b, c = x0.shape[0], x0.shape[-1]
    k0, k_loop = jax.random.split(rng)
    noise0 = jax.random.normal(k0, x0.shape, x0.dtype) if init_noise is None else init_noise.astype(x0.dtype)
    x = noise0 * m[..., None] + x0 * (1.0 - m[..., None])
    context = jnp.concatenate([cond, uncond], axis=0)
    unet_in_mask = m[..., None]

    def body(i, carry):
        x, pred_mask = carry
        t = timesteps[i]
        tt = jnp.full((2 * b,), t, jnp.int32)
        inp = jnp.concatenate([x, unet_in_mask], axis=-1)
        out = apply_fn(params, jnp.concatenate([inp, inp], axis=0), tt, context,
                       jnp.concatenate([levels, levels], axis=0)).astype(x0.dtype)
        eps_c, eps_u = out[:b, ..., :c], out[b:, ..., :c]
        eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
        noise = jax.random.normal(jax.random.fold_in(k_loop, i), x.shape, x.dtype) if cfg.eta > 0 else None
        x = ddim_step(eps, t, t - ratio, x, acp, final, cfg.eta, noise)
        predicted = predicted_region(out[:b, ..., c], m, cfg)
        region = m if not cfg.use_predicted_mask else jnp.where(i < warmup, m, predicted)
        x = x * region[..., None] + x0 * (1.0 - region[..., None])
        if progress is not None:
            jax.debug.callback(progress, i)
        return x, predicted

    x, pred = jax.lax.fori_loop(0, cfg.num_steps, body, (x, m))
    return x, pred


def predicted_region(mask_logit: jax.Array, user_mask: jax.Array, cfg: SamplerConfig) -> jax.Array:
    """Binarise, dilate and clip the predicted object mask to the user's mask ([B,h,w]);
    fall back to the user mask where the prediction is (nearly) empty."""
    pred = (jax.nn.sigmoid(mask_logit.astype(jnp.float32)) > cfg.mask_threshold).astype(user_mask.dtype)
    pred = dilate(pred, cfg.mask_dilate) * user_mask
    share = pred.sum(axis=(1, 2)) / jnp.maximum(user_mask.sum(axis=(1, 2)), 1.0)
    return jnp.where((share < cfg.min_predicted_fraction)[:, None, None], user_mask, pred)
