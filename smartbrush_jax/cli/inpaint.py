"""`python -m smartbrush_jax.inpaint` (or `smartbrush-inpaint`): paint a prompted object into a masked region.

    python -m smartbrush_jax.inpaint --checkpoint /models/sd-v1-2 --image photo.jpg \\
        --mask mask.png --prompt "a flamingo" --precision 3 --out out/

`--checkpoint` is a training workdir (its latest checkpoint, EMA weights), a diffusers
folder (a SmartBrush export, or a plain SD folder to which channel surgery is applied:
untrained SmartBrush channels), or a single-file SD checkpoint (`.ckpt`/`.safetensors`,
with `--tokenizer DIR`). Writes `result.png` (the input's size),
`predicted_mask.png`, `grid.png` (input with mask outline | result | predicted mask) and
`inpaint.json` (what was asked) into `--out`, a new folder (or, with `--overwrite`, one an
earlier inpaint wrote; never a folder of somebody else's), written beside it and swapped in
when complete. The model runs at the size it was trained at unless `--resolution` says
otherwise. Bad input exits with code 2 and a message saying what is wrong, before the model
loads where it can be told then.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np
from PIL import Image

from smartbrush_jax import storage
from smartbrush_jax.box import Box
from smartbrush_jax.errors import InputError, run_command, warn
from smartbrush_jax.images import MAX_PIXELS, read_gray, read_rgb
from smartbrush_jax.interop.loader import ema_choice
from smartbrush_jax.sampling.solvers import SAMPLERS
from smartbrush_jax.settings import SamplerConfig


def build_parser() -> argparse.ArgumentParser:
    d = SamplerConfig()
    p = argparse.ArgumentParser(prog="smartbrush-inpaint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="diffusers folder or single-file SD checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder (vocab.json, merges.txt); needed for a single file")
    p.add_argument("--ema", choices=("auto", "ema", "raw"), default="auto",
                   help="a single-file -full-ema release: its EMA U-Net (auto: when present) or the raw one")
    p.add_argument("--image", required=True, help="input image (any format Pillow reads)")
    region = p.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", help="mask PNG, white = region to fill")
    region.add_argument("--box", help="region as a box X0,Y0,X1,Y1 in pixels (X1, Y1 exclusive)")
    p.add_argument("--prompt", required=True, help='the object to paint, e.g. "a flamingo"')
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional text)")
    p.add_argument("--precision", type=int, default=0,
                   help="shape precision level s: 0 = follow the mask exactly ... S = the mask is only a box")
    p.add_argument("--levels", type=int, default=10, help="number of precision levels S for a plain SD checkpoint")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                   help="ddim, dpm++2m (DPM-Solver++ 2M), euler or euler_a (Euler ancestral)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpm++2m and euler)")
    p.add_argument("--steps", type=int, default=d.num_steps, help="sampler steps")
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--mask-warmup", type=float, default=d.mask_warmup,
                   help="fraction of steps that regenerate the whole user mask before the predicted mask is used")
    p.add_argument("--mask-threshold", type=float, default=d.mask_threshold, help="on the predicted mask probability")
    p.add_argument("--mask-dilate", type=int, default=d.mask_dilate, help="latent cells added around the prediction")
    p.add_argument("--no-predicted-mask", action="store_true", help="regenerate the whole user mask at every step")
    p.add_argument("--feather", type=float, default=4.0, help="feathering radius (pixels) of the final composite")
    p.add_argument("--resolution", type=int, default=None,
                   help="longest side the model runs at (default: the size it was trained at, 512 for plain SD)")
    p.add_argument("--out", default="inpaint_out", help="output folder (new, or one of ours with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that an earlier inpaint wrote")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    hint = negative_box_hint(argv)
    if hint:
        print(f"error: {hint}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


def negative_box_hint(argv: list) -> str | None:
    """What to write instead when `--box` is followed by a value that starts with a minus
    (`--box -5,-5,10,10`): argparse takes it for a flag and says only "expected one argument"."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--box" and re.match(r"-\d", value):
            return (f"--box {value}: a value that starts with '-' is read as a flag: write --box={value} "
                    "(with '=')")
    return None


GRID_MAX = 2048  # grid.png is scaled down to this many pixels per panel side
MARKER = "inpaint.json"  # what says a folder is an inpaint command's output


def is_inpaint_output(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def run(args) -> int:
    from smartbrush_jax.outputs import check_output

    image = read_image(args.image)
    h, w = image.shape[:2]
    mask = read_mask(args.mask, (h, w)) if args.mask else box_mask(args.box, (h, w))
    if not mask.any():
        raise InputError("the mask is empty: mark the region to fill in white")
    try:
        sampler = SamplerConfig(sampler=args.sampler, karras=args.karras, num_steps=args.steps,
                                guidance_scale=args.guidance, eta=args.eta,
                                use_predicted_mask=not args.no_predicted_mask, mask_warmup=args.mask_warmup,
                                mask_threshold=args.mask_threshold, mask_dilate=args.mask_dilate)
    except ValueError as e:
        raise InputError(_as_flags(str(e))) from None
    if args.num_samples < 1 or (args.resolution is not None and args.resolution < 8) or \
            not (math.isfinite(args.feather) and args.feather >= 0):
        raise InputError("--num-samples must be >= 1, --resolution >= 8 and --feather finite and >= 0")

    if args.levels < 1:
        raise InputError(f"--levels must be >= 1, got {args.levels}")
    # the output before the model loads: a folder we may not write is said before any long work
    check_output(args.out, [args.image, args.mask, args.checkpoint], is_inpaint_output, args.overwrite,
                 what="folder of inpaint results", need_bytes=h * w * 3 * (2 * args.num_samples + 3))  # PNGs <= raw

    from smartbrush_jax.sampling.runner import MAX_SEED, Inpainter

    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be in [0, {MAX_SEED}] (a 32-bit seed), got {args.seed}")

    if storage.isfile(args.checkpoint) and args.tokenizer is None:
        raise InputError("a single-file checkpoint holds no tokenizer: pass --tokenizer DIR "
                         "(a folder with vocab.json and merges.txt)")
    if not storage.exists(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint}: no such file or folder")
    inpainter = Inpainter.load(args.checkpoint, args.tokenizer, args.levels, ema_choice(args.ema), warn=warn)
    if not 0 <= args.precision <= inpainter.num_levels:
        raise InputError(f"--precision must be in [0, {inpainter.num_levels}] for this model, got {args.precision}")
    _, truncated = inpainter.tokenize(args.prompt)
    if truncated:
        warn(f"the prompt is longer than {inpainter.max_tokens} tokens and was truncated")
    if inpainter.tokenize(args.negative_prompt)[1]:
        warn(f"the negative prompt is longer than {inpainter.max_tokens} tokens and was truncated")
    resolution = args.resolution or inpainter.resolution
    inpainter.check_sampler(sampler, "--steps")
    side = max(inpainter.latent_size((h, w), resolution))
    if sampler.mask_dilate > side:  # past the latent's longest side: every cell already
        warn(f"--mask-dilate {sampler.mask_dilate} is more than the latent's longest side ({side} cells at this "
             f"resolution), which already reaches the whole region: using {side}")
        sampler = dataclasses.replace(sampler, mask_dilate=side)

    from smartbrush_jax.compositing import make_grid
    from smartbrush_jax.outputs import building

    start = time.time()
    result = inpainter(image, mask, args.prompt, args.negative_prompt, args.precision, args.seed, args.num_samples,
                       sampler, resolution, args.feather, progress=_Progress(args.steps))
    print(f"sampled {args.num_samples} image(s) at {result.working_size[1]}x{result.working_size[0]} "
          f"in {time.time() - start:.1f}s", file=sys.stderr)
    names = []
    with building(args.out) as tmp:  # OUT.partial, swapped in when every file is written
        for i, (img, pm) in enumerate(zip(result.images, result.predicted_masks)):
            suffix = "" if i == 0 else f"_{i}"
            names.append(_save(img, tmp, f"result{suffix}.png"))
            names.append(_save(pm.astype(np.uint8) * 255, tmp, f"predicted_mask{suffix}.png"))
        grid = make_grid(image, mask, result)
        if max(h, w) > GRID_MAX:  # a preview: a 8000 px photo's grid would be 8000 x 24000
            scale = GRID_MAX / max(h, w)
            grid = np.asarray(Image.fromarray(grid).resize((round(grid.shape[1] * scale),
                                                            round(grid.shape[0] * scale)), Image.Resampling.BOX))
        names.append(_save(grid, tmp, "grid.png"))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"checkpoint": args.checkpoint, "image": args.image, "prompt": args.prompt,
                       "precision": args.precision, "seed": args.seed, "resolution": resolution,
                       "working_size": list(result.working_size), "files": names}, f, indent=2)
    for name in names:
        print(os.path.join(args.out, name))
    return 0


_FLAGS = {"guidance_scale": "--guidance", "num_steps": "--steps", "eta is": "--eta is", "eta must": "--eta must",
          "karras is": "--karras is", "mask_warmup": "--mask-warmup",
          "mask_threshold": "--mask-threshold", "mask_dilate": "--mask-dilate"}


def _as_flags(message: str) -> str:
    """A SamplerConfig message in the command's own words (`--guidance`, not `guidance_scale`)."""
    for field, flag in _FLAGS.items():
        message = message.replace(field, flag)
    return message


def read_image(path: str, max_pixels: int = MAX_PIXELS, flag: str = "--image") -> np.ndarray:
    """RGB uint8 [H, W, 3] (`images.read_rgb`: the app's reader and limit too)."""
    return read_rgb(path, f"{flag} {path}", max_pixels)


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] at the image's size; white (> 0.5) = region."""
    values = read_gray(path, f"--mask {path}")
    if values.shape != size:
        warn(f"--mask {path} is {values.shape[1]}x{values.shape[0]}, the image {size[1]}x{size[0]}: resized "
             "(nearest neighbour)")
        values = np.asarray(Image.fromarray(values).resize((size[1], size[0]), Image.Resampling.NEAREST))
    if not np.isin(values, (0, 255)).all():
        warn(f"--mask {path} is not binary (values other than 0 and 255): thresholded at 0.5")
    return values > 127


def box_mask(spec: str, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.split(","))
    except ValueError:
        raise InputError(f"--box {spec!r}: expected four integers X0,Y0,X1,Y1") from None
    if x0 >= x1 or y0 >= y1:
        raise InputError(f"--box {spec}: needs X0 < X1 and Y0 < Y1")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise InputError(f"--box {spec} lies outside the {w}x{h} image")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        warn(f"--box {spec} extends past the {w}x{h} image: clipped")
    return Box(max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)).mask((h, w))


def _save(array: np.ndarray, folder: str, name: str) -> str:
    Image.fromarray(array).save(os.path.join(folder, name))
    return name


class _Progress:
    """`sampling  12/50` on stderr, rewritten in place; called from inside the jitted loop."""

    def __init__(self, total: int):
        self.total = total
        self.start = time.time()

    def __call__(self, i) -> None:
        i = int(i) + 1
        end = "\n" if i == self.total else ""
        print(f"\rsampling {i:>4d}/{self.total} ({time.time() - self.start:.1f}s)", end=end, file=sys.stderr,
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
