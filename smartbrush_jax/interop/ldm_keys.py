"""Key names of the original single-file Stable Diffusion checkpoints (CompVis/LDM layout).

SD v1.x was released as one `.ckpt` holding `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (CLIP text). SD 2.x keeps
the U-Net and VAE names and holds its OpenCLIP ViT-H text tower in open_clip's own names
under `cond_stage_model.model.*` (24 layers; diffusers and we use the first 23). SDXL holds
CLIP-L under `conditioner.embedders.0.transformer.*` (transformers' names) and OpenCLIP
bigG under `conditioner.embedders.1.model.*` (open_clip's), and its `text_time` embedding
as the U-Net's `label_emb.0`. These functions map a diffusers / transformers key to its
LDM or open_clip key, per config, so one table serves reading (`loader.load_single_file`)
and writing (`diffusers_to_ldm`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_PREFIX_OLD = "cond_stage_model.transformer."  # checkpoints written by transformers < 4.22
SD2_TEXT_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H, open_clip's names
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL's CLIP-L, transformers' names
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG, open_clip's names

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "class_embedding": "label_emb", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# transformers CLIPTextModel key (without "text_model.") -> open_clip text-tower key
_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                   "text_projection.weight": "text_projection"}  # transposed: open_clip multiplies x @ P
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")  # open_clip fuses them into attn.in_proj_{weight,bias}, in this order
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # open_clip tensors the text encoder has no use for
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


def layout_family(state: Mapping[str, np.ndarray]) -> str:
    """Which release layout a single-file state dict has: "sdxl", "sd2" or "sd1"."""
    if any(k.startswith(SDXL_TEXT2_PREFIX) for k in state):
        return "sdxl"
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        return "sd2"
    return "sd1"


def openclip_to_transformers(state: Mapping[str, np.ndarray], prefix: str, num_layers: int,
                             projection: bool) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """The transformers CLIPTextModel(WithProjection) state dict (keys without "text_model.")
    of the open_clip text tower under `prefix`: its first `num_layers` blocks (SD 2.x's file
    holds one more, which diffusers drops), the projection only where the model has one.
    Returns it and the keys under `prefix` that were not read and are not known to be unused
    (a file of another architecture)."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return np.asarray(state[key])

    for hf, oc in _OPENCLIP_FIXED.items():
        if prefix + oc in state and (projection or hf != "text_projection.weight"):
            out[hf] = take(prefix + oc).T if oc == "text_projection" else take(prefix + oc)
    for i in range(num_layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            if f"{src}attn.in_proj_{part}" in state:
                for name, chunk in zip(_QKV, np.split(take(f"{src}attn.in_proj_{part}"), 3, axis=0)):
                    out[f"{dst}self_attn.{name}.{part}"] = chunk
            for hf, oc in _OPENCLIP_LAYER.items():
                if f"{src}{oc}.{part}" in state:
                    out[f"{dst}{hf}.{part}"] = take(f"{src}{oc}.{part}")
    deeper = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    unused = [k for k in state if k.startswith(prefix) and k not in used
              and k[len(prefix):] not in OPENCLIP_UNUSED + ("text_projection",)
              and not ((m := deeper.match(k)) and int(m.group(1)) >= num_layers)]
    return out, unused


def transformers_to_openclip(text: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    """The inverse of `openclip_to_transformers`: a transformers CLIP text state dict in
    open_clip's names under `prefix` (q/k/v fused)."""
    out = {}
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    for hf, oc in _OPENCLIP_FIXED.items():
        if hf in text:
            out[prefix + oc] = text[hf].T if oc == "text_projection" else text[hf]
    layers = sorted({int(k.split(".")[2]) for k in text if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = np.concatenate([text[f"{src}self_attn.{n}.{part}"] for n in _QKV])
            for hf, oc in _OPENCLIP_LAYER.items():
                out[f"{dst}{oc}.{part}"] = text[f"{src}{hf}.{part}"]
    return out


def diffusers_to_ldm(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray],
                     unet_config, vae_config, family: str = "sd1",
                     text2: Mapping[str, np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Assemble one LDM-layout state dict of `family`'s release layout from the diffusers
    state dicts (VAE attention projections become 1x1 convs, as in the original
    checkpoints; SD 2.x's and SDXL's second text encoder in open_clip's names)."""
    out = {}
    for k, v in unet.items():
        out[UNET_PREFIX + unet_key(k, unet_config.layers_per_block, unet_config.up_block_types)] = v
    for k, v in vae.items():
        if ".attentions." in k and v.ndim == 2:
            v = v[:, :, None, None]
        out[VAE_PREFIX + vae_key(k, len(vae_config.block_out_channels))] = v
    if family == "sd2":
        out.update(transformers_to_openclip(text, SD2_TEXT_PREFIX))
        return out
    prefix = SDXL_TEXT_PREFIX if family == "sdxl" else TEXT_PREFIX
    for k, v in text.items():
        out[prefix + k.removeprefix("text_model.")] = v
    if family == "sdxl":
        out.update(transformers_to_openclip(text2, SDXL_TEXT2_PREFIX))
    return out
