"""`smartbrush-export` / `python -m smartbrush_jax.cli.export`: a training run -> a diffusers
folder (`smartbrush_jax.interop.export.export_workdir`); `--verify` compares diffusers' U-Net with ours.
The export's smartbrush.json records the sha256 of every file written (`interop.file_hashes`):
`inpaint`, `eval` and the PyTorch pipeline refuse a file whose bytes changed since."""

from __future__ import annotations

import argparse
import sys

from smartbrush_jax.errors import run_command
from smartbrush_jax.interop.export import export_workdir, verify_unet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartbrush-export", description=__doc__)
    p.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/ and model.json)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, unless --overwrite); never "
                                              "inside or around --workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="export the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw training weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is an export")
    p.add_argument("--verify", action="store_true", help="compare diffusers' U-Net output with ours after export")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        path = export_workdir(args.workdir, args.out, step=args.step, ema=args.ema, overwrite=args.overwrite)
        if args.verify:
            err = verify_unet(args.workdir, path, step=args.step, ema=args.ema)
            print(f"verify: diffusers vs smartbrush_jax U-Net, max relative difference {err:.2e}")
            if err > 1e-4:
                print("error: the exported U-Net does not reproduce ours", file=sys.stderr)
                return 1
        return 0

    return run_command(command)


if __name__ == "__main__":
    raise SystemExit(main())
