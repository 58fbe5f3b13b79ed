"""Which sampler to default to: each candidate on the held-out scenes of a trained run, with
the numbers that say whether fewer steps lose anything SmartBrush promises.

    python bench/samplers.py --workdir runs/demo --json bench/results/cpu_demo_samplers.json

For each held-out object (`data.synthetic.heldout_scenes`) at precision levels 0, 5 and
10 (the user mask is the exact mask degraded to that level, as `cli.demo` does), every
sampler inpaints with the same seed. Per sampler, over all cases:

- `mask_iou`: the predicted object mask against the exact one (what the mask head gives
  the background rule);
- `background_error`: mean |result - input| (0-255) over the pixels inside the user's
  mask but outside the object: background that should survive and was repainted;
- `outside_changed`: pixels outside the user's mask that differ (0 by construction);
- `seconds_per_image` on this machine;
- `vs_first`: each metric's mean per-case difference from the first candidate (DDIM x50,
  the paper's sampler) and its standard error: the cases are paired (same scene, level,
  seed), so a difference within about two standard errors is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (environment stamp, path setup)

CANDIDATES = (("ddim", False, 50), ("dpm++2m", False, 20), ("dpm++2m", True, 20), ("euler", False, 30),
              ("ddim", False, 20))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--num-scenes", type=int, default=8)
    ap.add_argument("--levels", default="0,5,10")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    from PIL import Image

    from smartbrush_jax.checkpoints import read_model_config
    from smartbrush_jax.data.synthetic import heldout_scenes
    from smartbrush_jax.interop.loader import load_workdir, trained_resolution
    from smartbrush_jax.masks import degrade_mask
    from smartbrush_jax.sampling.runner import Inpainter
    from smartbrush_jax.settings import DEGRADE, SamplerConfig

    scenes = heldout_scenes(args.workdir, args.num_scenes)
    step, sd = load_workdir(args.workdir)
    run = read_model_config(args.workdir)
    degrade, guidance = run.get("degrade", DEGRADE), run.get("sampler", {}).get("guidance_scale", 7.5)
    inpainter = Inpainter(sd, resolution=trained_resolution(args.workdir) or 512)  # what its messages quote
    levels = [int(x) for x in args.levels.split(",")]
    cases = []
    for k, (path, exact, prompt) in enumerate(scenes):
        image = np.asarray(Image.open(path).convert("RGB"))
        for level in levels:
            user = np.asarray(jax.device_get(degrade_mask(exact[None].astype(np.float32), np.array([level]),
                                                          inpainter.num_levels, **degrade)))[0] > 0.5
            cases.append((k, level, image, exact, user, prompt))
    results = []
    for name, karras, steps in CANDIDATES:
        cfg = SamplerConfig(sampler=name, karras=karras, num_steps=steps, guidance_scale=guidance)
        ious, errors, outside, seconds = [], [], 0, []
        for k, level, image, exact, user, prompt in cases:
            start = time.perf_counter()
            result = inpainter(image, user, prompt, precision=level, seed=k, sampler=cfg,
                               resolution=max(image.shape[:2]), feather=0.0)
            seconds.append(time.perf_counter() - start)
            pred = result.predicted_masks[0]
            ious.append((pred & exact).sum() / max((pred | exact).sum(), 1))
            keep = user & ~exact
            diff = np.abs(result.images[0].astype(np.float64) - image)
            errors.append(diff[keep].mean() if keep.any() else 0.0)
            outside += int((diff[~user] > 0).any(axis=-1).sum())
        row = {"sampler": name, "karras": karras, "steps": steps, "cases": len(cases),
               "mask_iou": float(np.mean(ious)), "background_error": float(np.mean(errors)),
               "outside_changed": outside, "seconds_per_image": float(np.median(seconds[1:] or seconds)),
               "per_case": {"mask_iou": [float(x) for x in ious], "background_error": [float(x) for x in errors]}}
        if results:  # paired against the first candidate (the paper's DDIM x50): same scenes, levels, seeds
            row["vs_first"] = {k: paired(row["per_case"][k], results[0]["per_case"][k]) for k in row["per_case"]}
        results.append(row)
        vs = row.get("vs_first")
        print(f"{name}{' karras' if karras else ''} x{steps}: mask IoU {row['mask_iou']:.3f}, background error "
              f"{row['background_error']:.2f}, outside changed {outside}, {row['seconds_per_image']:.2f} s/image"
              + (f"; against the first: IoU {vs['mask_iou']['mean']:+.3f} +- {vs['mask_iou']['se']:.3f}, "
                 f"background {vs['background_error']['mean']:+.2f} +- {vs['background_error']['se']:.2f} (mean "
                 "difference +- its standard error over the cases)" if vs else ""), file=sys.stderr)
    out = {"workdir": args.workdir, "step": step, "levels": levels, "scenes": len(scenes), "guidance": guidance,
           "results": results, **_common.environment()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


def paired(a, b) -> dict:
    """Mean and standard error of the per-case differences a - b."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")}


if __name__ == "__main__":
    sys.exit(main())
