"""Write a `pretrained.StableDiffusion` bundle as a diffusers folder (safetensors only), the
inverse of `pretrained.load_diffusers_folder`: what `smartbrush-export` (a SmartBrush U-Net,
read by `pytorch.SmartBrushPipeline`) and `smartbrush-convert` (a stock SD folder, read by
`diffusers.StableDiffusionPipeline`) write.

    unet/          UNet2DConditionModel config + diffusion_pytorch_model.safetensors
    vae/           AutoencoderKL (absent for a pixel-space SmartBrush run)
    text_encoder/  CLIPTextModel config + model.safetensors
    tokenizer/     CLIPTokenizer (with the slow tokenizer's vocab.json and merges.txt)
    text_encoder_2/, tokenizer_2/  SDXL's second encoder (CLIPTextModelWithProjection) and tokenizer
    scheduler/     DDIMScheduler: the bundle's noise schedule, leading spacing, no clipping
    model_index.json
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

PIPELINES = ("SmartBrushPipeline", "StableDiffusionPipeline")
SETTINGS_VERSION = 1  # of the smartbrush.json an export writes beside its components


def write_diffusers_folder(sd, out: str, pipeline: str = "StableDiffusionPipeline") -> None:
    """Write `sd` into the existing, empty-or-new folder `out` (callers build it beside the
    target and swap it in: `outputs.building`)."""
    import diffusers
    import jax
    from safetensors.numpy import save_file

    from smartbrush_jax.diffusion import NoiseSchedule
    from smartbrush_jax.interop.weights import flax_to_torch

    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")

    def weights(params, folder, name, config, prefix=""):
        os.makedirs(os.path.join(out, folder))
        state = {(k if k.startswith("text_projection.") else prefix + k): np.ascontiguousarray(v, np.float32)
                 for k, v in flax_to_torch(jax.device_get(params)).items()}
        save_file(state, os.path.join(out, folder, name), metadata={"format": "pt"})
        write_json(os.path.join(out, folder, "config.json"), config)

    version = {"_diffusers_version": diffusers.__version__}
    weights(sd.unet_params, "unet", "diffusion_pytorch_model.safetensors", {**sd.unet_config.to_diffusers(), **version})
    weights(sd.text_params, "text_encoder", "model.safetensors", {**sd.text_config.to_transformers(),
                                                                  "torch_dtype": "float32"})
    if sd.vae_config is not None:
        weights(sd.vae_params, "vae", "diffusion_pytorch_model.safetensors", {**sd.vae_config.to_diffusers(),
                                                                            **version})
    sdxl = sd.text2_config is not None
    if sdxl:  # CLIPTextModelWithProjection keeps transformers' text_model. prefix on all but the projection
        weights(sd.text2_params, "text_encoder_2", "model.safetensors", {**sd.text2_config.to_transformers(),
                                                                         "torch_dtype": "float32"}, "text_model.")
    for folder, tok in (("tokenizer", sd.tokenizer), ("tokenizer_2", sd.tokenizer_2 if sdxl else None)):
        if tok is None:
            continue
        tok.save_pretrained(os.path.join(out, folder))
        source = getattr(tok, "name_or_path", "")
        for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files too, for tools that read only those
            if os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(out, folder, name)):
                shutil.copy(os.path.join(source, name), os.path.join(out, folder, name))
    schedule = NoiseSchedule.from_diffusers(sd.scheduler_config)
    os.makedirs(os.path.join(out, "scheduler"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), {
        "_class_name": "DDIMScheduler", **version, "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
        "set_alpha_to_one": schedule.set_alpha_to_one, "steps_offset": schedule.steps_offset,
        "clip_sample": False, "prediction_type": schedule.prediction_type,
        # the spacing only where the source said one: unset, each scheduler class uses its own
        # default (DDIM leading, DPM-Solver and Euler linspace), as with SD's own configs
        **({"timestep_spacing": schedule.timestep_spacing} if schedule.timestep_spacing else {})})
    index = {"_class_name": pipeline, **version,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"] if sd.vae_config is not None else [None, None],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    if sdxl:  # what diffusers' StableDiffusionXLPipeline reads
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=False)
        if pipeline == "StableDiffusionPipeline":
            index["_class_name"] = "StableDiffusionXLPipeline"
    if pipeline == "StableDiffusionPipeline" and not sdxl:  # a stock SD folder: no safety checker shipped
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    write_json(os.path.join(out, "model_index.json"), index)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
