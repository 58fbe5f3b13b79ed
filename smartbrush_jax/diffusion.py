"""Noise schedule, SmartBrush's forward process and loss (the sampler: `sampling/sampler.py`).

Shapes: latents `[B, h, w, C]` (C = 4 for SD's VAE), masks on the latent grid `[B, h, w]`
float in {0, 1}, text context `[B, T, D]`, timesteps and precision levels `[B]` int32. The
U-Net is any `apply_fn(params, x [B,h,w,C+1], t [B], context, levels) -> [B,h,w,C+1]`
(noise, then the mask logit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from smartbrush_jax.masks import degrade_mask, dice_loss, mask_iou
from smartbrush_jax.settings import PREDICTIONS, SPACINGS, LossConfig

ApplyFn = Callable[..., jax.Array]
# diffusers' names of the schedules `NoiseSchedule.betas` computes (what DDIM and the solvers take)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# ---------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """SD's discrete schedule: `num_train_timesteps` betas, scaled_linear by default."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False  # SD v1's DDIM config
    steps_offset: int = 1
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" or "v_prediction" (SD 2.x 768)
    # how a sampler spaces its steps ("leading", "linspace", "trailing"); None: each diffusers
    # scheduler's own default, as when a config that does not say is loaded into it
    timestep_spacing: Optional[str] = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"scheduler: prediction_type {self.prediction_type!r} is not supported "
                             f"({', '.join(PREDICTIONS)})")
        if self.timestep_spacing not in (None,) + SPACINGS:
            raise ValueError(f"scheduler: timestep_spacing {self.timestep_spacing!r} is not supported "
                             f"({', '.join(SPACINGS)})")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler: beta_schedule {self.beta_schedule!r} is not supported "
                             f"({', '.join(BETA_SCHEDULES)})")

    @classmethod
    def from_diffusers(cls, cfg: Optional[dict]) -> "NoiseSchedule":
        """From a diffusers `scheduler_config.json` dict (None: SD v1 defaults)."""
        cfg = cfg or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        if self.beta_schedule == "squaredcos_cap_v2":  # the cosine schedule (Nichol & Dhariwal 2021)
            return cosine_betas(n)
        raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported ({', '.join(BETA_SCHEDULES)})")

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float32, computed in float64."""
        return np.cumprod(1.0 - self.betas()).astype(np.float32)


def cosine_betas(n: int, max_beta: float = 0.999, offset: float = 0.008) -> np.ndarray:
    """The "squaredcos_cap_v2" betas: alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)^2 on t in
    [0, 1], beta_i = 1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), capped at `max_beta` (the
    last steps would reach 1); float64."""
    t = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = np.cos((t + offset) / (1.0 + offset) * np.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


# ---------------------------------------------------------------------------- forward process
def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
    """`sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, per example."""
    abar = alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def compose_noisy_latent(x0: jax.Array, noise: jax.Array, t: jax.Array, mask: jax.Array,
                         alphas_cumprod: jax.Array) -> jax.Array:
    """SmartBrush's x_t: noisy inside the (degraded) mask, the clean latent outside."""
    m = mask[..., None]
    return add_noise(x0, noise, t, alphas_cumprod) * m + x0 * (1.0 - m)


# ---------------------------------------------------------------------------- loss
def smartbrush_loss(apply_fn: ApplyFn, params: Any, batch: Dict[str, jax.Array], rng: jax.Array,
                    alphas_cumprod: jax.Array,
                    cfg: LossConfig = LossConfig(),
                    prediction_type: str = "epsilon") -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The SmartBrush objective for one batch; pure, jittable, differentiable in `params`.

    batch: `latents` [B,h,w,C] (scaled VAE latents), `masks` [B,h,w] (exact object masks on
    the latent grid), `context` [B,T,D]; optional `levels` [B] (else uniform in [0, S]; an
    image-text example carries a full mask, for which every level gives the same mask).
    `prediction_type`: the U-Net's parameterisation, whose target the MSE takes: the noise
    (`epsilon`) or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (`v_prediction`); the mask
    head's DICE is the same for both.
    Returns (loss, parts) with parts `mse`, `dice`, `iou` (predicted mask at 0.5 against
    the exact mask), `t`, `levels`.
    """
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type {prediction_type!r}; one of {PREDICTIONS}")
    x0, m = batch["latents"], batch["masks"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_s, k_eps = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    levels = batch.get("levels")
    if levels is None:
        levels = jax.random.randint(k_s, (b,), 0, cfg.num_levels + 1)
    noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
    m_s = degrade_mask(m, levels, cfg.num_levels, cfg.sigma_scale, cfg.truncate, cfg.threshold)
    x_t = compose_noisy_latent(x0, noise, t, m_s, alphas_cumprod)
    out = apply_fn(params, jnp.concatenate([x_t, m_s[..., None]], axis=-1), t, batch["context"], levels)
    c = x0.shape[-1]  # latent channels: 4 for SD's VAE, 3 for a pixel-space model
    pred, logit = out[..., :c].astype(jnp.float32), out[..., c].astype(jnp.float32)
    target = noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod[t][:, None, None, None]
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    sq = (pred - target.astype(jnp.float32)) ** 2
    if cfg.eps_region == "all":
        mse = sq.mean()
    else:
        w = jnp.broadcast_to(m_s[..., None], sq.shape)
        mse = (sq * w).sum() / jnp.maximum(w.sum(), 1.0)
    prob = jax.nn.sigmoid(logit)
    _, dice = dice_loss(prob, m)
    loss = mse + cfg.dice_weight * dice
    iou = mask_iou(prob > 0.5, m).mean()
    return loss, {"mse": mse, "dice": dice, "iou": iou, "t": t, "levels": levels}
