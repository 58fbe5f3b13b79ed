"""Tiny random Stable Diffusion components, built in PyTorch and saved in the real formats.

Tests load these files through the same code a user runs. Weights are the reference
libraries' default init plus noise, so that no norm is the identity and no bias is zero.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, sample_size=16,
)
# SD-2.x-style options: linear projections, per-block head counts, two transformer layers.
TINY_UNET_V2 = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24, attention_head_dim=(2, 4, 8),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1,
    norm_num_groups=16, sample_size=16,
)
# SDXL-style: no attention at the first level, deeper transformers further down, head dim
# from head counts, and the "text_time" micro-conditioning (pooled text 16 + 6 ids x 8)
TINY_UNET_XL = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=40, attention_head_dim=(2, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=16, sample_size=16,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
)
TINY_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu")


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed=seed)


def torch_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb(AutoencoderKL(**{**TINY_VAE, **overrides}), seed=seed)


def write_tokenizer(folder: str) -> int:
    """A CLIP-format BPE tokenizer knowing a few words. Returns the vocabulary size."""
    from smartbrush_jax.models.tokenizer import write_word_tokenizer

    return write_word_tokenizer(folder, ["the cat", "a red star", "at"])


def torch_text(vocab_size: int, seed: int = 0, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1, **{**TINY_TEXT, **overrides})
    return perturb(CLIPTextModel(cfg), seed=seed)


# SD's noise schedule, as every released SD scheduler config states it
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sd_ddim(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, **overrides)


def tiny_sd_models(tok_dir: str, seed: int = 0, unet_overrides=None, text_overrides=None):
    """The tokenizer (written to `tok_dir`), U-Net, VAE and text encoder of a tiny SD v1/2 pipeline."""
    vocab = write_tokenizer(tok_dir)
    return {
        "unet": torch_unet(seed, **(unet_overrides or {})),
        "vae": torch_vae(seed + 1),
        "text_encoder": torch_text(vocab, seed + 2, **(text_overrides or {})),
    }


def write_sd_folder(path: str, seed: int = 0, unet_overrides=None, safe_serialization: bool = True):
    """A complete diffusers SD folder with tiny random components. Returns the torch models."""
    os.makedirs(path, exist_ok=True)
    models = tiny_sd_models(os.path.join(path, "tokenizer"), seed, unet_overrides)
    for name, m in models.items():
        m.save_pretrained(os.path.join(path, name), safe_serialization=safe_serialization)
    sd_ddim().save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "DDIMScheduler"]}, f)
    return models


def state_dict_numpy(model: torch.nn.Module):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_trees_equal(a, b):
    """Two Flax parameter trees hold the same paths and bit-identical arrays."""
    from flax import traverse_util

    fa, fb = (traverse_util.flatten_dict(t) for t in (a, b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity test states."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def write_sdxl_folder(path: str, seed: int = 0):
    """A tiny random SDXL pipeline folder, written by diffusers' `StableDiffusionXLPipeline`
    itself: CLIP-style encoder (16 wide) + projected encoder (24 wide, projection 16), their
    penultimate states concatenated to the U-Net's 40-wide context, Euler scheduler; the
    second tokenizer pads with "!" as SDXL's does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = os.path.join(path, "_tok")
    vocab = write_tokenizer(tok_dir)
    common = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                  max_position_embeddings=77, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(seed)
    text = perturb(CLIPTextModel(CLIPTextConfig(hidden_size=16, hidden_act="quick_gelu", **common)), seed=seed)
    text2 = perturb(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=16, hidden_act="gelu",
                                                               **common)), seed=seed + 1)
    unet = torch_unet(seed + 2, **TINY_UNET_XL)
    vae = torch_vae(seed + 3, scaling_factor=0.13025)  # SDXL's VAE latent scale
    sched = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True, pad_token="!")  # as SDXL's tokenizer_2
    assert tok2.pad_token_id != tok.pad_token_id
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(path, safe_serialization=True)
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2}


def write_sd2_folder(path: str, seed: int = 0, prediction_type: str = "v_prediction"):
    """A tiny random SD 2.x pipeline folder, written by diffusers' `StableDiffusionPipeline`
    itself: the SD 2.x U-Net design (linear projections, two transformer layers), an
    OpenCLIP-style text encoder (GELU, 24 wide as the U-Net's context), and SD 2.1's
    scheduler config (v-prediction, leading spacing, offset 1)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(path, "_tok")
    models = tiny_sd_models(tok_dir, seed, TINY_UNET_V2, dict(
        hidden_size=TINY_UNET_V2["cross_attention_dim"], hidden_act="gelu", num_attention_heads=4,
        intermediate_size=48))
    sched = sd_ddim(steps_offset=1, prediction_type=prediction_type, timestep_spacing="leading")
    tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    pipe = StableDiffusionPipeline(**models, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return models
