"""`prepare` throughput: examples/s at 640x480 with 1 and with N workers in one run (the
ratio is the figure: it survives a noisy machine), and BLIP captions/s.

    python bench/prepare.py                                  # 1 vs 2 workers, tiny BLIP on the CPU
    python bench/prepare.py --workers 8 --images 2000
    python bench/prepare.py --blip-only --blip-size base --blip-device cuda --blip-batch 64

The data: a COCO-format set written to a temporary folder, `--images` JPEGs of 640x480
(smooth colour fields with shapes, quality 90, about the size of COCO's files), each with
`--objects` polygon annotations. Both runs prepare the same set with the library the
command uses (`smartbrush_jax.data.prepare`), into fresh folders. BLIP: a random model
with transformers' `BlipForConditionalGeneration` (`tiny`: the tests' 1-layer model;
`base`: BLIP base's shapes, 384 px), captioning object crops of the set in batches of
`--blip-batch`; a random model writes the whole `max_new_tokens` (30), so this is the
slow end of real captioning (BLIP's captions stop after about 10-15 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write_set(root: str, images: int, objects: int, seed: int = 0) -> dict:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    w, h = 640, 480
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"thing{i}"} for i in range(1, 11)]}
    for i in range(1, images + 1):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack([255 * (0.5 + 0.5 * np.sin(xx / (40 + 60 * a) + c)),
                         255 * (0.5 + 0.5 * np.cos(yy / (30 + 50 * b))),
                         255 * (xx + yy) / (w + h)], -1)
        base += rng.normal(0, 12, base.shape)  # texture: JPEG sizes like photos', not flat fields
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for k in range(objects):
            cx, cy, r = rng.uniform(80, w - 80), rng.uniform(80, h - 80), rng.uniform(30, 75)
            t = np.sort(rng.uniform(0, 2 * np.pi, 8))
            poly = [(float(cx + r * np.cos(a) * rng.uniform(0.7, 1.0)), float(cy + r * np.sin(a) * rng.uniform(0.7, 1)))
                    for a in t]
            draw.polygon(poly, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            coco["annotations"].append({
                "id": i * 100 + k, "image_id": i, "category_id": int(rng.integers(1, 11)), "iscrowd": 0,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "segmentation": [[v for p in poly for v in p]]})
        name = f"{i:06d}.jpg"
        im.save(os.path.join(img_dir, name), quality=90)
        coco["images"].append({"id": i, "file_name": name, "width": w, "height": h})
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return {"annotations": path, "images": img_dir}


def object_crops(raw: dict, n: int) -> list:
    """`n` crops around the set's objects (their boxes grown as BLIP is shown them), from
    the JSON's boxes: no COCO tools needed (the GPU machine has none)."""
    from PIL import Image

    from smartbrush_jax.data.blip import caption_crop

    coco = json.load(open(raw["annotations"]))
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    crops = []
    for ann in coco["annotations"][:n]:
        image = np.asarray(Image.open(os.path.join(raw["images"], names[ann["image_id"]])).convert("RGB"))
        x, y, w, h = ann["bbox"]
        crops.append(caption_crop(image, [x, y, x + w, y + h]))
    return [crops[i % len(crops)] for i in range(n)]


def time_prepare(raw: dict, out: str, workers: int, unit_images: int) -> dict:
    from smartbrush_jax.data.prepare import prepare
    from smartbrush_jax.data.sources import CocoSource

    source = CocoSource(raw["annotations"], raw["images"], images_per_unit=unit_images)
    os.makedirs(out)
    start = time.perf_counter()
    meta = prepare(out, {"coco": source}, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    n = meta["components"]["seg"]["count"]
    return {"workers": workers, "examples": n, "seconds": seconds, "examples_per_s": n / seconds}


def time_blip(model_dir: str, device: str, batch: int, crops: list, dtype: str) -> dict:
    from smartbrush_jax.data.captioning import CaptionSpec

    spec = CaptionSpec(model_dir, device, batch, dtype)
    start = time.perf_counter()
    captioner = spec.load(spec.devices()[0])
    load_s = time.perf_counter() - start
    captioner.caption(crops[:batch])  # warm-up (kernels, allocator)
    start = time.perf_counter()
    out = captioner.caption(crops)
    seconds = time.perf_counter() - start
    return {"device": device, "dtype": str(captioner.dtype).replace("torch.", ""), "batch": batch,
            "captions": len(out), "seconds": seconds, "captions_per_s": len(out) / seconds, "load_s": load_s,
            "example_caption": out[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--objects", type=int, default=5, help="annotations per image")
    p.add_argument("--workers", type=int, default=2, help="compared with 1 worker")
    p.add_argument("--unit-images", type=int, default=16)
    p.add_argument("--blip-size", choices=("tiny", "base"), default="tiny")
    p.add_argument("--blip-device", default="cpu")
    p.add_argument("--blip-dtype", default="auto")
    p.add_argument("--blip-batch", type=int, default=16)
    p.add_argument("--blip-crops", type=int, default=256)
    p.add_argument("--blip-only", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from data_fixtures import write_blip

    # no JAX in this process before the timing (`environment()` imports it): the command
    # forks its workers, which a process running JAX's threads may not do
    result = {"images": args.images, "objects_per_image": args.objects, "size": "640x480"}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as root:
        raw = write_set(os.path.join(root, "raw"), args.images if not args.blip_only else 16, args.objects)
        if not args.blip_only:
            one = time_prepare(raw, os.path.join(root, "w1"), 1, args.unit_images)
            many = time_prepare(raw, os.path.join(root, f"w{args.workers}"), args.workers, args.unit_images)
            assert one["examples"] == many["examples"]
            result["prepare"] = [one, many]
            result["speedup"] = many["examples_per_s"] / one["examples_per_s"]
        model = os.path.join(root, "blip")
        write_blip(model, args.blip_size)
        crops = object_crops(raw, args.blip_crops)
        result["blip"] = {"size": args.blip_size, **time_blip(model, args.blip_device, args.blip_batch, crops,
                                                              args.blip_dtype)}
    from _common import environment

    result = {**environment(), **result}
    print()
    if "prepare" in result:
        print(f"{'workers':>8s}{'examples':>10s}{'seconds':>9s}{'examples/s':>12s}   ({result['size']}, "
              f"{result['cpus']} cores)")
        for r in result["prepare"]:
            print(f"{r['workers']:>8d}{r['examples']:>10d}{r['seconds']:>9.2f}{r['examples_per_s']:>12.1f}")
        print(f"speed-up {args.workers} workers / 1: {result['speedup']:.2f}x")
    b = result["blip"]
    print(f"BLIP {b['size']} on {b['device']} ({b['dtype']}, batch {b['batch']}): {b['captions_per_s']:.1f} "
          f"captions/s ({b['captions']} in {b['seconds']:.1f}s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
