"""Export a training run to a diffusers folder that stock diffusers/transformers load.

    python -m smartbrush_jax.cli.export --workdir runs/demo --out exports/demo [--step N] [--no-ema] [--verify]
    (the command: smartbrush_jax/cli/export.py; here the library: export_workdir, verify_unet)

    exports/demo/
      unet/          UNet2DConditionModel: latent+1 in / latent+1 out, num_class_embeds = S + 1
      vae/           AutoencoderKL (absent for a pixel-space run, e.g. the demo)
      text_encoder/  CLIPTextModel
      tokenizer/     CLIPTokenizer
      scheduler/     DDIMScheduler (leading spacing, no clipping: our sampler's schedule)
      model_index.json, smartbrush.json (levels, mask degradation, sampler defaults, and the
                     sha256 of every other file: `file_hashes`, checked by every loader)

Weights are written as safetensors only, through the mapping in `weights.py`. The folder
is written under a temporary name and renamed when complete, so a stopped export never
leaves a half-written model behind. `--verify` runs the exported U-Net in diffusers and
ours on the same random input and prints the relative difference.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import numpy as np

from smartbrush_jax.errors import InputError
from smartbrush_jax.interop.diffusers_writer import SETTINGS_VERSION, write_diffusers_folder, write_json


class ExportError(InputError):
    """Bad input to the export: reported as `error: ...`, exit code 2."""


def is_export(folder: str) -> bool:
    """A folder `smartbrush-export` wrote (its marker: smartbrush.json beside model_index.json)."""
    return all(os.path.isfile(os.path.join(folder, n)) for n in ("smartbrush.json", "model_index.json"))


def export_workdir(workdir: str, out: str, step: Optional[int] = None, ema: bool = True,
                   overwrite: bool = False) -> str:
    """Write the diffusers folder for `workdir`'s checkpoint; returns `out`."""
    from smartbrush_jax.checkpoints import read_model_config
    from smartbrush_jax.interop.loader import load_workdir
    from smartbrush_jax.outputs import building, check_output

    check_output(out, [workdir], is_export, overwrite, what="SmartBrush export")
    cfg = read_model_config(workdir)
    try:
        step, sd = load_workdir(workdir, step, ema)
    except ValueError as e:  # WeightsError: a frozen text encoder that does not fit model.json
        raise ExportError(f"{workdir}: {e}") from e
    print(f"exporting {workdir} step {step} ({'EMA' if ema else 'raw'} weights) to {out}", file=sys.stderr)
    with building(out) as tmp:
        write_export(sd, tmp, _settings(cfg, workdir, step, ema))
    return out


def write_export(sd, out: str, settings: dict) -> None:
    """`sd` (a `pretrained.StableDiffusion` with a SmartBrush U-Net) as a diffusers folder
    plus `smartbrush.json`, which records the sha256 of every file written before it."""
    from smartbrush_jax.interop.file_hashes import KEY, SETTINGS_FILE, folder_checksums
    from smartbrush_jax.outputs import PARTIAL_MARKER

    write_diffusers_folder(sd, out, pipeline="SmartBrushPipeline")
    sums = folder_checksums(out, skip=(PARTIAL_MARKER,))  # the marker `building` removes when done
    write_json(os.path.join(out, SETTINGS_FILE), {**settings, KEY: sums})


def _settings(cfg: dict, workdir: str, step: int, ema: bool) -> dict:
    """smartbrush.json: what the PyTorch pipeline and eval need beyond the components."""
    from smartbrush_jax.settings import DEGRADE, SamplerConfig

    sampler_cfg = dataclasses.asdict(SamplerConfig())
    sampler_cfg.update(cfg.get("sampler", {}))
    return {
        "format_version": SETTINGS_VERSION,
        "num_levels": cfg["num_levels"],
        "family": cfg.get("family"),  # the base model's (interop/families.py); None for a from-scratch run
        "autoencoder": "identity" if cfg.get("autoencoder") == "identity" else "kl",
        "resolution": cfg.get("resolution", 512),
        "feather": cfg.get("feather", round(4.0 * cfg.get("resolution", 512) / 512, 2)),  # 4 px at 512 px
        "degrade": cfg.get("degrade", DEGRADE),  # runs before model.json recorded it trained with the defaults
        "sampler": sampler_cfg,
        "source": {"workdir": os.path.abspath(workdir), "step": int(step), "ema": bool(ema)},
    }


def verify_unet(workdir: str, folder: str, step: Optional[int] = None, ema: bool = True, seed: int = 0) -> float:
    """max|diffusers - ours| / max|ours| of the U-Net on one random input (fp32)."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from smartbrush_jax.compositing import downsampling_factor
    from smartbrush_jax.interop.loader import load_workdir

    _, sd = load_workdir(workdir, step, ema)
    cfg = sd.unet_config
    rng = np.random.default_rng(seed)
    size = downsampling_factor(cfg.block_out_channels) * 2
    x = rng.standard_normal((2, size, size, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    levels = np.array([0, cfg.num_class_embeddings - 1], np.int32)
    ours = np.asarray(jax.jit(sd.unet().apply)({"params": sd.unet_params}, jnp.asarray(x), jnp.asarray(t),
                                               jnp.asarray(ctx), jnp.asarray(levels)))
    model = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), local_files_only=True).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                    class_labels=torch.from_numpy(levels).long()).sample.permute(0, 2, 3, 1).numpy()
    return float(np.abs(ref - ours).max() / np.abs(ours).max())
