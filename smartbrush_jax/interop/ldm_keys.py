"""Key names of the original single-file Stable Diffusion checkpoints (CompVis/LDM layout).

SD v1.x was released as one `.ckpt` holding `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (CLIP text). These
functions map a diffusers key to its LDM key, per config, so one table serves reading
(`ldm_to_diffusers`) and writing (`diffusers_to_ldm`).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_PREFIX_OLD = "cond_stage_model.transformer."  # checkpoints written by transformers < 4.22

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "class_embedding": "label_emb"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split_module(rest: str, table: Mapping[str, str]) -> str:
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def unet_key(key: str, layers_per_block: int, up_block_types) -> str:
    """diffusers U-Net key -> LDM key (without the `model.diffusion_model.` prefix)."""
    per = layers_per_block + 1
    for src, dst in _UNET_FIXED.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + i * per + j if side == "down" else i * per + j
        block = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{block}.{idx}.0.{_split_module(rest, _UNET_RESNET)}"
        return f"{block}.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m.group(1))
        slot = 2 if up_block_types[i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * per + layers_per_block}.{slot}.conv.{m.group(2)}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_split_module(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"no LDM name for U-Net key {key!r}")


def vae_key(key: str, num_blocks: int) -> str:
    """diffusers VAE key -> LDM key (without the `first_stage_model.` prefix)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, rest = key.split(".", 1)
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)", rest)
    if m:
        side, i, what, tail = m.group(1), int(m.group(2)), m.group(3), m.group(5)
        ldm_i = i if side == "down" else num_blocks - 1 - i
        if what.startswith("resnets"):
            return f"{part}.{side}.{ldm_i}.block.{m.group(4)}.{_split_module(tail, _VAE_RESNET)}"
        return f"{part}.{side}.{ldm_i}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
    if m:
        kind, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{_split_module(tail, _VAE_RESNET)}"
        return f"{part}.mid.attn_1.{_split_module(tail, _VAE_ATTN)}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def diffusers_to_ldm(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray],
                     unet_config, vae_config) -> Dict[str, np.ndarray]:
    """Assemble one LDM-layout state dict from three diffusers state dicts (VAE attention
    projections become 1x1 convs, as in the original checkpoints)."""
    out = {}
    for k, v in unet.items():
        out[UNET_PREFIX + unet_key(k, unet_config.layers_per_block, unet_config.up_block_types)] = v
    for k, v in vae.items():
        if ".attentions." in k and v.ndim == 2:
            v = v[:, :, None, None]
        out[VAE_PREFIX + vae_key(k, len(vae_config.block_out_channels))] = v
    for k, v in text.items():
        out[TEXT_PREFIX + k.removeprefix("text_model.")] = v
    return out
