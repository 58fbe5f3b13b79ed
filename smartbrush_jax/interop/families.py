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
