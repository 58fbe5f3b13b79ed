"""`smartbrush-convert` / `python -m smartbrush_jax.cli.convert --ckpt sd-v1-2.ckpt --tokenizer DIR --out DIR`:
a single-file SD v1, 2.x or SDXL release -> a stock diffusers folder (`smartbrush_jax.interop.convert.convert`,
whose docstring says what is read and written)."""

from __future__ import annotations

import argparse

from smartbrush_jax.errors import run_command
from smartbrush_jax.interop.convert import __doc__ as CONVERT_DOC
from smartbrush_jax.interop.convert import convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartbrush-convert", description=CONVERT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the single-file checkpoint (.ckpt / .safetensors, CompVis keys)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--out", required=True, help="the diffusers folder to write (must not exist, unless --overwrite)")
    p.add_argument("--ema", choices=("auto", "ema", "raw"), default="auto",
                   help="which U-Net weights of a -full-ema release (default: EMA when present)")
    p.add_argument("--configs-from", default=None,
                   help="a diffusers folder whose unet/vae/text_encoder configs to use instead of SD v1's "
                        "(for a checkpoint of another size)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the checkpoint predicts: required for SD 2.x (2.x 768-v: v_prediction, 2.x base: "
                        "epsilon); SD v1 and SDXL releases predict epsilon, the default for them")
    p.add_argument("--ignore-extra-keys", action="store_true",
                   help="drop keys that belong to no component (a LoRA's, another model's) and list them, "
                        "instead of refusing the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that this command wrote")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    out = convert(args.ckpt, args.tokenizer, args.out, ema=args.ema, configs_from=args.configs_from,
                  overwrite=args.overwrite, prediction_type=args.prediction_type,
                  ignore_extra_keys=args.ignore_extra_keys)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
