"""`python -m smartbrush_jax.cli.convert --ckpt sd-v1-2.ckpt --tokenizer DIR --out DIR [--ema auto]
[--prediction-type epsilon|v_prediction]`

A single-file Stable Diffusion v1, 2.x or SDXL checkpoint (the CompVis release `.ckpt`, a
PyTorch Lightning checkpoint, or a `.safetensors` with the release's key names: SD 2.x's
`v2-1_768-ema-pruned.safetensors`, SDXL's `sd_xl_base_1.0.safetensors`) -> a stock diffusers
folder, safetensors only, that `diffusers.StableDiffusionPipeline.from_pretrained` (SDXL:
`StableDiffusionXLPipeline`) loads. The family is read from the file's keys. An SD 2.x file
does not say whether it predicts v (2.x 768-v) or epsilon (2.x base): `--prediction-type`
says it, and the folder's scheduler config keeps it.
Convert once; every later tool (training's `init_from`, `inpaint`, diffusers) then reads
the safe folder instead of unpickling the release again.

The `.ckpt` is read with `torch.load(weights_only=True)`: its Lightning metadata becomes
inert stand-ins (`pickle_allowlist`), anything else is refused. A `-full-ema` release holds
two U-Nets: `--ema auto` (default) takes the EMA weights when the file has them, `ema`
requires them, `raw` takes the non-EMA ones. The release holds no tokenizer: `--tokenizer`
is a folder with vocab.json and merges.txt (CLIP ViT-L/14's; the OpenCLIP encoders of SD
2.x and SDXL use the same vocabulary, padded with "!"). `--out` follows the export's
rules: new, or with `--overwrite` a folder this command wrote (it holds
`converted_from.json`), never the checkpoint's own folder; written beside it and renamed
when complete.

The file is refused, naming the key, when a tensor is NaN/inf or not floating point (CLIP's
int64 `position_ids` aside), when it holds two families' text encoders, or keys of no
component (a LoRA's: `lora_unet_...`); `--ignore-extra-keys` drops the latter and lists them.
The tensors a release carries beside its components (the LDM trainer's schedule buffers,
`model_ema.decay`) are not components and are left out without a word.
"""

from __future__ import annotations

import os
import sys

from smartbrush_jax.errors import InputError

MARKER = "converted_from.json"


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def convert(ckpt: str, tokenizer: str, out: str, ema: str = "auto", configs_from: str | None = None,
            overwrite: bool = False, prediction_type: str | None = None, ignore_extra_keys: bool = False) -> str:
    """Write the diffusers folder for `ckpt` at `out`; returns `out`."""
    from smartbrush_jax.interop.diffusers_writer import write_diffusers_folder, write_json
    from smartbrush_jax.interop.loader import ema_choice, load_single_file, read_configs
    from smartbrush_jax.outputs import building, check_output

    if not os.path.isfile(ckpt):
        raise InputError(f"--ckpt {ckpt}: no such file")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):  # what transformers >= 5 writes alone
        for name in ("vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(tokenizer, name)):
                raise InputError(f"--tokenizer {tokenizer}: no {name} and no tokenizer.json (give the CLIP "
                                 "tokenizer folder)")
    choice = ema_choice(ema)
    configs = read_configs(configs_from) if configs_from else {}
    check_output(out, [ckpt, tokenizer, configs_from], is_converted, overwrite, what="converted SD folder")
    print(f"reading {ckpt}", file=sys.stderr)
    sd = load_single_file(ckpt, tokenizer_dir=tokenizer, ema=choice, prediction_type=prediction_type,
                          ignore_extra_keys=ignore_extra_keys, **configs)
    with building(out) as tmp:
        write_diffusers_folder(sd, tmp, pipeline="StableDiffusionPipeline")
        write_json(os.path.join(tmp, MARKER), {"checkpoint": os.path.abspath(ckpt), "ema": ema,
                                               "tokenizer": os.path.abspath(tokenizer)})
    pipeline = "StableDiffusionXLPipeline" if sd.text2_config is not None else "StableDiffusionPipeline"
    print(f"wrote {out}: load it with diffusers' {pipeline}.from_pretrained, or use it as "
          f"--config.model.init_from / inpaint --checkpoint", file=sys.stderr)
    return out
