"""Flax modules of Stable Diffusion v1 (and SmartBrush's U-Net additions). Nothing else."""

from smartbrush_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from smartbrush_jax.models.unet import UNet2DConditionModel
from smartbrush_jax.models.unet_config import UNetConfig
from smartbrush_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "sample_latent",
]
