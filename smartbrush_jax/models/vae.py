"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in flax.linen, channels-last.

`encode(pixels [B,H,W,3] in [-1,1]) -> (mean, logvar)` each `[B,H/f,W/f,latent]`,
`decode(latents [B,h,w,latent]) -> pixels [B,H,W,3]`. The scaling factor (0.18215 for
SD v1) is applied by callers through `VAEConfig.scaling_factor`, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from smartbrush_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dense,
    group_norm,
    multi_head_attention,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers `AutoencoderKL` config."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for t in cfg.get(key, [allowed]):
                if t != allowed:
                    raise ValueError(f"VAE config: {key} entry {t!r} is not supported (only {allowed!r})")
        for key, default in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                             ("mid_block_add_attention", True), ("shift_factor", None)):
            if cfg.get(key, default) != default:
                raise ValueError(f"VAE config: {key}={cfg[key]!r} is not supported (only {default!r})")
        boc = tuple(int(c) for c in cfg.get("block_out_channels", cls.block_out_channels))
        groups = int(cfg.get("norm_num_groups", 32))
        if any(c % groups for c in boc):
            raise ValueError(f"VAE config: block_out_channels {boc} not divisible by norm_num_groups={groups}")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=boc,
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            norm_num_groups=groups,
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            sample_size=int(cfg.get("sample_size") or 512),
        )

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "sample_size": self.sample_size,
            "act_fn": "silu",
        }


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block (GroupNorm, q/k/v, out, residual)."""

    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        t = group_norm(self.num_groups, 1e-6, "group_norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = (dense(c, name, **kw)(t) for name in ("to_q", "to_k", "to_v"))
        out = dense(c, "to_out_0", **kw)(multi_head_attention(q, k, v, num_heads=1))
        return out.reshape(b, h, w, c) + x


class _MidBlock(nn.Module):
    channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.num_groups, 1e-6, name="resnets_0", **kw)(x)
        x = VAEAttention(self.num_groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.num_groups, 1e-6, name="resnets_1", **kw)(x)


class _ResBlocks(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional resampler."""

    channels: int
    num_layers: int
    num_groups: int
    resample: Optional[str]  # "down", "up" or None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.num_groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            resample = "down" if i < n - 1 else None
            x = _ResBlocks(ch, cfg.layers_per_block, cfg.norm_num_groups, resample, name=f"down_blocks_{i}", **kw)(x)
        x = _MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rev = cfg.block_out_channels[::-1]
        x = conv(rev[0], 3, "conv_in", **kw)(z)
        x = _MidBlock(rev[0], cfg.norm_num_groups, name="mid_block", **kw)(x)
        for i, ch in enumerate(rev):
            resample = "up" if i < len(rev) - 1 else None
            x = _ResBlocks(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, resample, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> diagonal Gaussian; post_quant_conv -> decoder."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.config, **kw)
        self.decoder = Decoder(self.config, **kw)
        self.quant_conv = conv(2 * self.config.latent_channels, 1, "quant_conv", **kw)
        self.post_quant_conv = conv(self.config.latent_channels, 1, "post_quant_conv", **kw)

    def encode(self, pixels: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """pixels [B,H,W,3] in [-1,1] -> (mean, logvar) [B,H/f,W/f,latent]; logvar clipped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(pixels))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents [B,h,w,latent] (unscaled) -> pixels [B,H,W,3]."""
        return self.decoder(self.post_quant_conv(latents))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        mean, _ = self.encode(pixels)
        return self.decode(mean)


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Draw from the diagonal Gaussian `N(mean, exp(logvar))`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
