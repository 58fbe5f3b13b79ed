"""What turns pixels into the U-Net's latents and back: SD's VAE, or the identity for a
model that works on pixels (the demo). Both have one interface, so the trainer, the
held-out grids and the `Inpainter` never ask which one they have.

Pixels are `[B, H, W, 3]` float in [-1, 1]; latents `[B, H/f, W/f, C]` float32, already
multiplied by the VAE's scaling factor (what the U-Net sees).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from smartbrush_jax.compositing import downsampling_factor


@dataclasses.dataclass(frozen=True)
class VAE:
    """SD's AutoencoderKL: latents are a draw from (or the mean of) its encoder's Gaussian."""

    module: Any  # models.AutoencoderKL
    kind: str = "vae"

    @property
    def config(self):
        return self.module.config

    @property
    def factor(self) -> int:
        return downsampling_factor(self.config.block_out_channels)

    @property
    def channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def moments(self, params, pixels):
        """(mean, logvar) of the encoder's Gaussian, unscaled (what a latent cache stores)."""
        return self.module.apply({"params": params}, pixels, method=self.module.encode)

    def draw(self, mean, logvar, rng) -> jax.Array:
        """z = mean + exp(logvar / 2) * noise (in the moments' dtype), as float32, scaled:
        a training latent."""
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return z.astype(jnp.float32) * self.scaling_factor

    def sample(self, params, pixels, rng) -> jax.Array:
        return self.draw(*self.moments(params, pixels), rng)

    def encode(self, params, pixels) -> jax.Array:
        """The mean latent, scaled: what inpainting starts from."""
        return self.moments(params, pixels)[0] * self.scaling_factor

    def decode(self, params, latents) -> jax.Array:
        return self.module.apply({"params": params}, latents / self.scaling_factor, method=self.module.decode)


@dataclasses.dataclass(frozen=True)
class Identity:
    """A pixel-space model: the "latents" are the pixels, 3 channels, factor 1, no weights."""

    kind: str = "identity"
    config: None = None
    factor: int = 1
    channels: int = 3
    scaling_factor: float = 1.0

    def draw(self, mean, logvar, rng):
        from smartbrush_jax.config import ConfigError

        raise ConfigError("a latent-cache batch needs a VAE model (config.model.autoencoder='vae')")

    def sample(self, params, pixels, rng) -> jax.Array:
        return pixels

    def encode(self, params, pixels) -> jax.Array:
        return pixels

    def decode(self, params, latents) -> jax.Array:
        return latents


def make_autoencoder(vae_config: Optional[Any], dtype=jnp.float32):
    """A `VAE` for a VAE config, the `Identity` for None."""
    if vae_config is None:
        return Identity()
    from smartbrush_jax.models import AutoencoderKL

    return VAE(AutoencoderKL(vae_config, dtype=dtype))
