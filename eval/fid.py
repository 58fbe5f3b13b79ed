"""FID, Local-FID and CLIP score of an exported SmartBrush model, laid out like the paper.

    python eval/fid.py --model exports/smartbrush --data data/prepared/coco_val \\
        --inception weights/pt_inception-2015-12-05-6726825d.pth --clip weights/clip-vit-base-patch32 \\
        --out eval_runs/coco [--num 1000] [--steps 50] [--guidance 7.5] [--device cuda]

For every item (image, object mask, prompt) of the evaluation set the model inpaints the
prompt twice: into the accurate mask at precision level 0, and into the mask's bounding box
at level S (the paper's two mask types). Then, per mask type:
  FID        Inception features of the whole generated images vs the real images
  Local-FID  the same over square crops around the object's bounding box (metrics.crops)
  CLIP       100 * max(cos, 0) between the generated crop and the prompt
Writes OUT/results.json, OUT/results.md (a table: rows methods, columns FID / Local-FID /
CLIP per mask type; `--add-row other/results.json` adds another run's row) and
OUT/examples.png. Generations are cached under OUT/generated/ as they are made, so a
stopped run continues where it stopped. Nothing is downloaded: the Inception and CLIP
weights are local files. Bad input: `error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image

from smartbrush_jax import storage
from smartbrush_jax.errors import InputError, run_command

MASK_TYPES = ("accurate", "bbox")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder written by smartbrush-export")
    p.add_argument("--data", required=True, help="prepared records folder (smartbrush-prepare) or a CSV of "
                                                 "image,mask,prompt")
    p.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth (FID Inception weights)")
    p.add_argument("--clip", required=True, help="local transformers CLIP model folder (for the CLIP score)")
    p.add_argument("--out", required=True, help="output folder (re-use it to resume)")
    p.add_argument("--num", type=int, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the export's smartbrush.json)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: smartbrush.json)")
    p.add_argument("--resolution", type=int, default=None, help="working resolution (default: smartbrush.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-field", default="label", help="record field used as the prompt (label or caption)")
    p.add_argument("--method", default=None, help="row name in the table (default: the model folder's name)")
    p.add_argument("--add-row", action="append", default=[], help="results.json of another run to add as a row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--examples", type=int, default=6, help="items shown in examples.png")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    results = run(args)  # MetricsError, PipelineError (bad files or folders) are InputErrors: exit 2
    print(render_table([results] + [_read_json(p) for p in args.add_row]))
    print(f"wrote {args.out}/results.json, results.md, examples.png")
    return 0


def run(args) -> dict:
    import torch

    from smartbrush_jax.metrics import ClipScorer, EvalSet, bbox_mask, load_inception, local_crop
    from smartbrush_jax.pytorch import SmartBrushPipeline

    for p in args.add_row:
        if not os.path.isfile(p):
            raise InputError(f"--add-row {p}: no such file")
    if args.num is not None and args.num < 1:
        raise InputError("--num must be >= 1")
    # everything that can be wrong is checked before the first generation
    evalset = EvalSet(args.data, limit=args.num, prompt_field=args.prompt_field)
    inception = load_inception(args.inception, args.device)
    clip = ClipScorer(args.clip, args.device)
    pipe = SmartBrushPipeline.from_pretrained(storage.local_copy(args.model), device=args.device)
    sampler = dataclasses.replace(pipe.sampler, **({"num_steps": args.steps} if args.steps else {}),
                                  **({"guidance_scale": args.guidance} if args.guidance is not None else {}))
    resolution = args.resolution or pipe.settings.get("resolution", 512)
    settings = {"model": storage.absolute(args.model), "data": os.path.abspath(args.data), "num": len(evalset),
                "seed": args.seed, "resolution": resolution, "sampler": dataclasses.asdict(sampler),
                "prompt_field": args.prompt_field}
    _check_resume(args.out, settings)
    torch.manual_seed(args.seed)

    real, real_crops, prompts, gen, gen_crops, pred_masks, shown = [], [], [], {}, {}, {}, []
    total, done, t0 = len(evalset) * len(MASK_TYPES), 0, time.time()
    for i, item in enumerate(evalset.items()):
        real.append(_resize(item.image))
        real_crops.append(local_crop(item.image, item.mask))
        prompts.append(item.prompt)
        row = []
        for mask_type in MASK_TYPES:
            mask = item.mask if mask_type == "accurate" else bbox_mask(item.mask)
            level = 0 if mask_type == "accurate" else pipe.num_levels
            image, pred, cached = _generate(pipe, args.out, mask_type, item, mask, level, args.seed + i, sampler,
                                            resolution)
            gen.setdefault(mask_type, []).append(_resize(image))
            gen_crops.setdefault(mask_type, []).append(local_crop(image, item.mask))
            pred_masks.setdefault(mask_type, []).append(pred)
            row.append((mask, image, pred))
            done += 1
            rate = (time.time() - t0) / done
            print(f"[{done}/{total}] {item.key} {mask_type} {'cached' if cached else 'generated'} "
                  f"({rate:.1f} s each, ~{rate * (total - done) / 60:.1f} min left)", file=sys.stderr, flush=True)
        if len(shown) < args.examples:
            shown.append((item.image, row))

    print("computing Inception features and CLIP scores", file=sys.stderr, flush=True)
    results = score(inception, clip, real, real_crops, prompts, gen, gen_crops)
    results.update(method=args.method or os.path.basename(os.path.abspath(args.model)), settings=settings)
    storage.write_text(storage.join(args.out, "results.json"), json.dumps(results, indent=2))
    storage.write_text(storage.join(args.out, "results.md"),
                       render_table([results] + [_read_json(p) for p in args.add_row]) + "\n")
    storage.write_bytes(storage.join(args.out, "examples.png"), _png(examples_grid(shown)))
    return results


def score(inception, clip, real, real_crops, prompts, gen, gen_crops) -> dict:
    """FID / Local-FID / CLIP score per mask type (plus the real crops' CLIP score)."""
    from smartbrush_jax.metrics import fid_from_features, inception_features

    real_f, real_cf = inception_features(inception, real), inception_features(inception, real_crops)
    out = {"num_items": len(real), "clip_real": float(np.mean(clip(real_crops, prompts))), "metrics": {}}
    for mask_type in gen:
        out["metrics"][mask_type] = {
            "fid": fid_from_features(real_f, inception_features(inception, gen[mask_type])),
            "local_fid": fid_from_features(real_cf, inception_features(inception, gen_crops[mask_type])),
            "clip": float(np.mean(clip(gen_crops[mask_type], prompts))),
        }
    return out


def render_table(rows: list) -> str:
    """Markdown like the paper's table: one row per method, FID / Local-FID / CLIP per mask type."""
    head = "| Method | " + " | ".join(f"{t} FID ↓ | {t} Local-FID ↓ | {t} CLIP ↑" for t in MASK_TYPES) + " |"
    lines = [head, "|---" * (1 + 3 * len(MASK_TYPES)) + "|"]
    for r in rows:
        cells = []
        for t in MASK_TYPES:
            m = r["metrics"].get(t, {})
            cells += [f"{m['fid']:.2f}" if "fid" in m else "-", f"{m['local_fid']:.2f}" if "local_fid" in m else "-",
                      f"{m['clip']:.2f}" if "clip" in m else "-"]
        lines.append(f"| {r['method']} (n={r['num_items']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _generate(pipe, out, mask_type, item, mask, level, seed, sampler, resolution):
    """(image, predicted mask, was_cached): from OUT/generated/ when there, else made and saved."""
    folder = storage.join(out, "generated", mask_type)
    img_path, mask_path = storage.join(folder, f"{item.key}.png"), storage.join(folder, f"{item.key}_mask.png")
    if storage.isfile(img_path) and storage.isfile(mask_path):
        image = np.asarray(Image.open(io.BytesIO(storage.read_bytes(img_path))).convert("RGB"))
        pred = np.asarray(Image.open(io.BytesIO(storage.read_bytes(mask_path)))) > 127
        if image.shape == item.image.shape:
            return image, pred, True
    result = pipe(item.image, mask, item.prompt, precision=level, seed=seed, sampler=sampler, resolution=resolution)
    # each file is written whole (beside and renamed, or one object); the image last: its presence means both are
    storage.write_bytes(mask_path, _png(result.predicted_masks[0].astype(np.uint8) * 255))
    storage.write_bytes(img_path, _png(result.images[0]))
    return result.images[0], result.predicted_masks[0], False


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _check_resume(out: str, settings: dict) -> None:
    """A re-used OUT must be an evaluation folder made with the same settings (its cache
    would mix otherwise); it may not be, hold or lie inside the model or the data."""
    from smartbrush_jax.outputs import check_output

    check_output(out, [settings["model"], settings["data"]], lambda d: storage.isfile(storage.join(d, "run.json")),
                 overwrite=True, what="evaluation folder")
    path = storage.join(out, "run.json")
    if storage.isfile(path):
        old = json.loads(storage.read_text(path))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise InputError(f"{out} holds a run with other settings ({', '.join(diff)} differ): "
                             "choose another --out or delete it")
        print(f"resuming in {out}", file=sys.stderr)
    storage.write_text(path, json.dumps(settings, indent=2))


def _resize(image: np.ndarray) -> np.ndarray:
    from smartbrush_jax.metrics import INPUT_SIZE, resize_uint8

    return resize_uint8(image, INPUT_SIZE)


def examples_grid(shown) -> np.ndarray:
    """Rows: per mask type, input with that mask outlined | result | predicted mask (128 px each)."""
    from smartbrush_jax.compositing import outline

    size = 128
    fit = lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))  # noqa: E731
    rows = []
    for image, cells in shown:
        parts = []
        for mask, result, pred in cells:
            src = image.copy()
            src[outline(mask, 1)] = (255, 0, 0)
            parts += [fit(src), fit(result), fit(np.repeat(pred.astype(np.uint8)[..., None] * 255, 3, axis=2))]
        rows.append(np.concatenate(parts, axis=1))
    return np.concatenate(rows, axis=0)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
