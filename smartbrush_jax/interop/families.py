"""Which Stable Diffusion a set of weights is: `sd1`, `sd2` or `sdxl`, and what each needs.

    family_of(unet_config, model_index)   -> "sd1" | "sd2" | "sdxl"
    check_family(wanted, found, where)    -> raises FamilyError on a mismatch
    refuse_inpainting_unet(unet_config)   -> raises FamilyError for a 9-channel U-Net

The family is read from what the files say, never guessed from a name: a diffusers
folder's `model_index.json` (`StableDiffusionXLPipeline` is SDXL) and its U-Net config
(SDXL's `addition_embed_type="text_time"`; SD 2.x's linear projections in the transformer
blocks, or its 1024-wide OpenCLIP-H context; else SD v1's design: one CLIP text encoder,
convolutional projections, no micro-conditioning). `config.model.family` ("auto"
by default) must agree with it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from smartbrush_jax.errors import InputError

FAMILIES = ("sd1", "sd2", "sdxl")


class FamilyError(InputError, ValueError):
    """Weights of another family than asked for, or a U-Net SmartBrush cannot start from."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    resolution: int  # the size the base model was trained at
    text_encoders: tuple  # the diffusers folder's text-encoder components
    context_dim: int  # the U-Net's cross-attention width


SPECS = {
    "sd1": Family("sd1", 512, ("text_encoder",), 768),
    "sd2": Family("sd2", 768, ("text_encoder",), 1024),  # 2.x base: 512 (the scheduler says epsilon there)
    "sdxl": Family("sdxl", 1024, ("text_encoder", "text_encoder_2"), 2048),
}


# The published full-size architectures of the SD 2.1 (768, v-prediction) and SDXL base 1.0
# components, as diffusers / transformers config fields: what `configs/tpu_v5p_sd2.py` and
# `configs/tpu_v5p_sdxl.py` compile without weights (a run from weights reads its own), and
# what the full-size shape tests build. SD v1's are `settings.ModelConfig`'s defaults.
SD21_UNET = {"block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
             "layers_per_block": 2, "cross_attention_dim": 1024, "use_linear_projection": True,
             "upcast_attention": True, "sample_size": 96,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
SDXL_UNET = {"block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20), "layers_per_block": 2,
             "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "sample_size": 128,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu", "projection_dim": 512}  # as diffusers ships SD 2.x's (one layer dropped)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu"}
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu", "projection_dim": 1280, "architectures": ["CLIPTextModelWithProjection"]}
ARCHITECTURES = {  # config.model.unet / text / text2 of each family's full-size model
    "sd2": {"unet": SD21_UNET, "text": OPENCLIP_H, "text2": {}},
    "sdxl": {"unet": SDXL_UNET, "text": CLIP_L, "text2": OPENCLIP_BIGG},
}
# Each family's VAE, told apart by its latent scale (the architectures are the same): SD v1 and
# 2.x share one; SDXL's was retrained, and a U-Net fed the other's latents sees garbage.
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def release_scheduler(family: str, prediction_type: str) -> dict:
    """The scheduler config of an SD 2.x / SDXL release (a single file carries none): SD's
    betas, leading spacing with offset 1, and the parameterisation, which only the user
    knows for SD 2.x (768-v: v_prediction; base: epsilon)."""
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "prediction_type": prediction_type}


def check_vae(family: str, vae_config, unet_config, where: str) -> None:
    """A VAE that does not belong with the U-Net: latents of another width, or another
    family's latent scale (SDXL's VAE beside an SD v1/2.x U-Net, or the other way)."""
    latent = vae_config.latent_channels
    if unet_config.in_channels not in (latent, latent + 1):
        raise FamilyError(f"{where}: the VAE makes {latent}-channel latents, the U-Net takes "
                          f"{unet_config.in_channels} channels: the vae/ folder is not this model's")
    want = VAE_SCALING[family]
    if abs(vae_config.scaling_factor - want) > 1e-6:
        owner = [f for f, v in VAE_SCALING.items() if abs(v - vae_config.scaling_factor) <= 1e-6]
        raise FamilyError(f"{where}: the VAE's scaling_factor {vae_config.scaling_factor} is "
                          f"{'the ' + '/'.join(owner) + ' VAE' if owner else 'no release VAE'}'s, this U-Net is "
                          f"{family} ({want}): put the {family} VAE in vae/")


def family_of(unet_config, model_index: Optional[dict] = None) -> str:
    """The family of a U-Net config (and the folder's `model_index.json`, when there is one)."""
    pipeline = (model_index or {}).get("_class_name", "")
    if getattr(unet_config, "micro_conditioning", False) or "XL" in pipeline:
        return "sdxl"
    if unet_config.cross_attention_dim == 1024 or unet_config.use_linear_projection:
        return "sd2"  # every SD 2.x U-Net has linear projections; no SD v1 release does
    return "sd1"  # CLIP-L's 768 and 1x1-conv projections, as any other one-encoder design


def check_family(wanted: str, found: str, where: str) -> None:
    """`config.model.family` against what the weights are ("auto" takes them as they are)."""
    if wanted not in ("auto",) + FAMILIES:
        raise FamilyError(f"config.model.family must be auto or one of {', '.join(FAMILIES)}, got {wanted!r}")
    if wanted != "auto" and wanted != found:
        raise FamilyError(f"{where} is {found}, not {wanted}: set config.model.family={found} (or auto), "
                          f"or point config.model.init_from at {wanted} weights")


def refuse_inpainting_unet(unet_config, where: str) -> None:
    """SD/SDXL inpainting checkpoints take 9 input channels (latent, masked-image latent,
    mask): SmartBrush starts from the text-to-image U-Net (4 in) and adds its own mask
    channel, so these are refused rather than cut down."""
    if unet_config.in_channels == 9:
        raise FamilyError(f"{where}: a 9-channel inpainting U-Net (latent + masked image + mask, as SD/SDXL "
                          "inpainting checkpoints have); SmartBrush trains from the text-to-image model of the "
                          "same family (4 input channels): point init_from at the base checkpoint")
