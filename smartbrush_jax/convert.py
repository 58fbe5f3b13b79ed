"""`python -m smartbrush_jax.convert --ckpt sd-v1-2.ckpt --tokenizer DIR --out DIR [--ema auto]`

A single-file Stable Diffusion v1 checkpoint (the CompVis release `.ckpt`, a PyTorch
Lightning checkpoint, or a `.safetensors` with the same key names) -> a stock diffusers
folder, safetensors only, that `diffusers.StableDiffusionPipeline.from_pretrained` loads.
Convert once; every later tool (training's `init_from`, `inpaint`, diffusers) then reads
the safe folder instead of unpickling the release again.

The `.ckpt` is read with `torch.load(weights_only=True)`: its Lightning metadata becomes
inert stand-ins (`pickle_allowlist`), anything else is refused. A `-full-ema` release holds
two U-Nets: `--ema auto` (default) takes the EMA weights when the file has them, `ema`
requires them, `raw` takes the non-EMA ones. The release holds no tokenizer: `--tokenizer`
is a folder with vocab.json and merges.txt (CLIP ViT-L/14's). `--out` follows the export's
rules: new, or with `--overwrite` a folder this command wrote (it holds
`converted_from.json`), never the checkpoint's own folder; written beside it and renamed
when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from smartbrush_jax.errors import InputError, run_command

MARKER = "converted_from.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartbrush-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the single-file checkpoint (.ckpt / .safetensors, CompVis keys)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--out", required=True, help="the diffusers folder to write (must not exist, unless --overwrite)")
    p.add_argument("--ema", choices=("auto", "ema", "raw"), default="auto",
                   help="which U-Net weights of a -full-ema release (default: EMA when present)")
    p.add_argument("--configs-from", default=None,
                   help="a diffusers folder whose unet/vae/text_encoder configs to use instead of SD v1's "
                        "(for a checkpoint of another size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that this command wrote")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    out = convert(args.ckpt, args.tokenizer, args.out, ema=args.ema, configs_from=args.configs_from,
                  overwrite=args.overwrite)
    print(out)
    return 0


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def convert(ckpt: str, tokenizer: str, out: str, ema: str = "auto", configs_from: str | None = None,
            overwrite: bool = False) -> str:
    """Write the diffusers folder for `ckpt` at `out`; returns `out`."""
    from smartbrush_jax.diffusers_writer import write_diffusers_folder, write_json
    from smartbrush_jax.outputs import building, check_output
    from smartbrush_jax.pretrained import ema_choice, load_single_file, read_configs

    if not os.path.isfile(ckpt):
        raise InputError(f"--ckpt {ckpt}: no such file")
    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(tokenizer, name)):
            raise InputError(f"--tokenizer {tokenizer}: no {name} (give the CLIP tokenizer folder)")
    choice = ema_choice(ema)
    configs = read_configs(configs_from) if configs_from else {}
    check_output(out, [ckpt, tokenizer, configs_from], is_converted, overwrite, what="converted SD folder")
    print(f"reading {ckpt}", file=sys.stderr)
    sd = load_single_file(ckpt, tokenizer_dir=tokenizer, ema=choice, **configs)
    with building(out) as tmp:
        write_diffusers_folder(sd, tmp, pipeline="StableDiffusionPipeline")
        write_json(os.path.join(tmp, MARKER), {"checkpoint": os.path.abspath(ckpt), "ema": ema,
                                               "tokenizer": os.path.abspath(tokenizer)})
    print(f"wrote {out}: load it with diffusers' StableDiffusionPipeline.from_pretrained, or use it as "
          f"--config.model.init_from / inpaint --checkpoint", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
