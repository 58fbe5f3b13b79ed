"""Export a training run to a diffusers folder that stock diffusers/transformers load.

    python -m smartbrush_jax.export --workdir runs/demo --out exports/demo [--step N] [--no-ema] [--verify]

    exports/demo/
      unet/          UNet2DConditionModel: latent+1 in / latent+1 out, num_class_embeds = S + 1
      vae/           AutoencoderKL (absent for a pixel-space run, e.g. the demo)
      text_encoder/  CLIPTextModel
      tokenizer/     CLIPTokenizer
      scheduler/     DDIMScheduler (leading spacing, no clipping: our sampler's schedule)
      model_index.json, smartbrush.json (levels, mask degradation, sampler defaults)

Weights are written as safetensors only, through the mapping in `weights.py`. The folder
is written under a temporary name and renamed when complete, so a stopped export never
leaves a half-written model behind. `--verify` runs the exported U-Net in diffusers and
ours on the same random input and prints the relative difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Optional

import numpy as np


class ExportError(Exception):
    """Bad input to the export: reported as `error: ...`, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartbrush-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/ and model.json)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, unless --overwrite)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="export the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw training weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--verify", action="store_true", help="compare diffusers' U-Net output with ours after export")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = export_workdir(args.workdir, args.out, step=args.step, ema=args.ema, overwrite=args.overwrite)
        if args.verify:
            err = verify_unet(args.workdir, path, step=args.step, ema=args.ema)
            print(f"verify: diffusers vs smartbrush_jax U-Net, max relative difference {err:.2e}")
            if err > 1e-4:
                print("error: the exported U-Net does not reproduce ours", file=sys.stderr)
                return 1
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def export_workdir(workdir: str, out: str, step: Optional[int] = None, ema: bool = True,
                   overwrite: bool = False) -> str:
    """Write the diffusers folder for `workdir`'s checkpoint; returns `out`."""
    from smartbrush_jax.checkpoints import load_workdir, read_model_config

    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} exists: choose another --out or pass --overwrite")
    cfg = read_model_config(workdir)
    try:
        step, sd = load_workdir(workdir, step, ema)
    except ValueError as e:  # WeightsError: a frozen text encoder that does not fit model.json
        raise ExportError(f"{workdir}: {e}") from e
    _check_shapes(sd.unet(), sd.unet_params, f"{workdir} step {step}")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"exporting {workdir} step {step} ({'EMA' if ema else 'raw'} weights) to {out}", file=sys.stderr)
    write_diffusers_folder(sd, tmp, settings=_settings(cfg, workdir, step, ema))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_diffusers_folder(sd, out: str, settings: dict) -> None:
    """`sd` (a `pretrained.StableDiffusion` with a SmartBrush U-Net) as a diffusers folder."""
    import diffusers
    import jax
    from safetensors.numpy import save_file

    from smartbrush_jax.diffusion import NoiseSchedule
    from smartbrush_jax.weights import flax_to_torch

    def weights(params, folder, name, config):
        os.makedirs(os.path.join(out, folder))
        state = {k: np.ascontiguousarray(v, np.float32) for k, v in flax_to_torch(jax.device_get(params)).items()}
        save_file(state, os.path.join(out, folder, name), metadata={"format": "pt"})
        _write_json(os.path.join(out, folder, "config.json"), config)

    version = {"_diffusers_version": diffusers.__version__}
    weights(sd.unet_params, "unet", "diffusion_pytorch_model.safetensors", {**sd.unet_config.to_diffusers(), **version})
    weights(sd.text_params, "text_encoder", "model.safetensors", {**sd.text_config.to_transformers(),
                                                                  "torch_dtype": "float32"})
    if sd.vae_config is not None:
        weights(sd.vae_params, "vae", "diffusion_pytorch_model.safetensors", {**sd.vae_config.to_diffusers(),
                                                                            **version})
    sd.tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    source = getattr(sd.tokenizer, "name_or_path", "")
    for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files too, for tools that read only those
        if os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(out, "tokenizer", name)):
            shutil.copy(os.path.join(source, name), os.path.join(out, "tokenizer", name))
    schedule = NoiseSchedule.from_diffusers(sd.scheduler_config)
    os.makedirs(os.path.join(out, "scheduler"))
    _write_json(os.path.join(out, "scheduler", "scheduler_config.json"), {
        "_class_name": "DDIMScheduler", **version, "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
        "set_alpha_to_one": schedule.set_alpha_to_one, "steps_offset": schedule.steps_offset,
        "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"})
    _write_json(os.path.join(out, "model_index.json"), {
        "_class_name": "SmartBrushPipeline", **version,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if sd.vae_config is not None else [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]})
    _write_json(os.path.join(out, "smartbrush.json"), settings)


def _settings(cfg: dict, workdir: str, step: int, ema: bool) -> dict:
    """smartbrush.json: what the PyTorch pipeline and eval need beyond the components."""
    from smartbrush_jax.pytorch.pipeline import SETTINGS_VERSION
    from smartbrush_jax.sampler_config import SamplerConfig

    sampler_cfg = dataclasses.asdict(SamplerConfig())
    sampler_cfg.update(cfg.get("sampler", {}))
    return {
        "format_version": SETTINGS_VERSION,
        "num_levels": cfg["num_levels"],
        "autoencoder": "identity" if cfg.get("autoencoder") == "identity" else "kl",
        "resolution": cfg.get("resolution", 512),
        "feather": cfg.get("feather", round(4.0 * cfg.get("resolution", 512) / 512, 2)),  # 4 px at 512 px
        "degrade": cfg.get("degrade", {"sigma_scale": 0.15, "truncate": 2.0, "threshold": 0.0}),
        "sampler": sampler_cfg,
        "source": {"workdir": os.path.abspath(workdir), "step": int(step), "ema": bool(ema)},
    }


def _check_shapes(module, params, source: str) -> None:
    import jax

    from smartbrush_jax.pretrained import abstract_params

    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params(module))}
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = [f"{k}: checkpoint {have.get(k)} vs model.json {s}" for k, s in want.items() if have.get(k) != s]
    extra = sorted(set(have) - set(want))
    if bad or extra:
        raise ExportError(f"{source}: the U-Net weights do not fit model.json's architecture "
                          f"({len(bad)} mismatched/missing, {len(extra)} unexpected): " + "; ".join((bad + extra)[:5]))


def verify_unet(workdir: str, folder: str, step: Optional[int] = None, ema: bool = True, seed: int = 0) -> float:
    """max|diffusers - ours| / max|ours| of the U-Net on one random input (fp32)."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from smartbrush_jax.checkpoints import load_workdir

    _, sd = load_workdir(workdir, step, ema)
    cfg = sd.unet_config
    rng = np.random.default_rng(seed)
    size = 2 ** (len(cfg.block_out_channels) - 1) * 2
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


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
