"""The demo's second half: inpaint held-out synthetic scenes with a trained run.

    python -m smartbrush_jax.cli.demo --workdir runs/demo

For a few held-out objects, degrades each mask to several precision levels and asks the
model to paint the same shape in another colour ("a green star" where a red star was).
Writes one PNG per case and `overview.png` (rows: scenes; per level: input with the
mask outlined | result | predicted mask), and prints the paths.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

from smartbrush_jax.data.synthetic import heldout_scenes
from smartbrush_jax.errors import run_command


def main(argv=None) -> int:
    return run_command(lambda: _main(argv))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--out", default=None, help="default: WORKDIR/inpaint")
    ap.add_argument("--num-scenes", type=int, default=4)
    ap.add_argument("--levels", default="0,5,10")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's, model.json)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's, model.json)")
    ap.add_argument("--scale", type=int, default=4, help="upscaling of the overview (nearest)")
    args = ap.parse_args(argv)

    import jax

    from smartbrush_jax.checkpoints import read_model_config
    from smartbrush_jax.compositing import make_grid
    from smartbrush_jax.interop.loader import load_workdir
    from smartbrush_jax.masks import degrade_mask
    from smartbrush_jax.sampling.runner import Inpainter
    from smartbrush_jax.settings import DEGRADE, SamplerConfig

    scenes = heldout_scenes(args.workdir, args.num_scenes)
    step, sd = load_workdir(args.workdir)
    run = read_model_config(args.workdir)  # the run's own degradation and sampler settings
    degrade, run_sampler = run.get("degrade", DEGRADE), run.get("sampler", {})
    inpainter = Inpainter(sd)
    levels = [int(x) for x in args.levels.split(",")]
    out = args.out or os.path.join(args.workdir, "inpaint")
    os.makedirs(out, exist_ok=True)
    sampler = SamplerConfig(sampler=run_sampler.get("sampler", SamplerConfig.sampler),
                            num_steps=args.steps or run_sampler.get("num_steps", SamplerConfig.num_steps),
                            guidance_scale=args.guidance or run_sampler.get("guidance_scale",
                                                                            SamplerConfig.guidance_scale))
    rows, paths = [], []
    for k, (image_path, exact, prompt) in enumerate(scenes):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        cells = []
        for level in levels:
            user = np.asarray(jax.device_get(degrade_mask(exact[None].astype(np.float32), np.array([level]),
                                                          inpainter.num_levels, **degrade)))[0] > 0.5
            result = inpainter(image, user, prompt, precision=level, seed=k, sampler=sampler,
                               resolution=max(image.shape[:2]), feather=0.0)
            g = make_grid(image, user, result)
            path = os.path.join(out, f"scene{k}_level{level}.png")
            Image.fromarray(g).save(path)
            paths.append(path)
            cells.append(g)
        rows.append(np.concatenate(cells, axis=1))
        print(f"scene {k}: '{prompt}' at levels {levels}", file=sys.stderr)
    overview = np.concatenate(rows, axis=0)
    overview = np.repeat(np.repeat(overview, args.scale, axis=0), args.scale, axis=1)
    ov_path = os.path.join(out, "overview.png")
    Image.fromarray(overview).save(ov_path)
    print(f"step {step}; per level: input with mask outline | result | predicted mask", file=sys.stderr)
    for p in paths + [ov_path]:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
