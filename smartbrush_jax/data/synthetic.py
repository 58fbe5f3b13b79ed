"""A procedural shapes data set that ships with the project: the demo's and the tests'
embedded default. Deterministic from a seed; no download.

    python -m smartbrush_jax.cli.synthetic --out data/shapes --num-scenes 2000 --size 64

Writes, in the formats real data comes in (so it travels the same code path):
    images/*.png            textured backgrounds with 1-3 coloured shapes
    annotations.json        COCO instances (compressed RLE masks of the visible parts)
    captions.jsonl          a longer caption per annotation ("a red star with a thin black outline")
    image_text-00000.tar    webdataset image-text pairs (whole scenes with scene captions)

A training run with `data.synthetic_scenes` > 0 keeps the set in `WORKDIR/data/`
(`build_run_set`): `raw_train/`, `raw_heldout/` (written as above; another seed),
`prepared/` and `heldout/` (prepared folders), `tokenizer/` (a word tokenizer of the
captions' words) and `READY` once all are complete. `heldout_scenes` reads the held-out
objects back for the demo and the app's examples.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ellipse", "hexagon", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "orange": (240, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25)}
BACKGROUNDS = ("stripes", "checks", "gradient", "noise")


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float, aspect: float):
    """Vertices of a shape centred at (cx, cy) with radius r (PIL polygon points)."""
    def ring(n, radii, offset=0.0):
        pts = []
        for i in range(n * len(radii)):
            a = angle + offset + 2 * math.pi * i / (n * len(radii))
            rr = radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * aspect * math.sin(a)))
        return pts

    if shape in ("circle", "ellipse"):
        return ring(48, [r])
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "diamond":
        return ring(4, [r])
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "star":
        return ring(5, [r, 0.45 * r], -math.pi / 2)
    raise ValueError(shape)


def render_background(rng: np.random.Generator, size: int):
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.integers(60, 200, 3).astype(np.float32)
    other = np.clip(base + rng.integers(-50, 50, 3), 0, 255)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if kind == "stripes":
        period = rng.integers(4, 12)
        t = ((xx + yy * rng.uniform(-1, 1)) // period) % 2
    elif kind == "checks":
        period = rng.integers(4, 12)
        t = ((xx // period + yy // period) % 2).astype(np.float32)
    elif kind == "gradient":
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    else:
        t = rng.uniform(size=(size, size)).astype(np.float32)
    img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), kind


def render_scene(rng: np.random.Generator, size: int):
    """One scene: (image [S,S,3] uint8, objects [{shape, colour, mask, outline, size_word}], background kind)."""
    img, bg = render_background(rng, size)
    canvas = Image.fromarray(img)
    objects = []
    for _ in range(rng.integers(1, 4)):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        aspect = rng.uniform(0.5, 0.8) if shape == "ellipse" else 1.0
        pts = shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi) if shape != "triangle" else 0.0, aspect)
        outline = rng.random() < 0.5
        mask_img = Image.new("L", (size, size), 0)
        # the same call shape as on the canvas (PIL rasterises fill+outline differently from a
        # fill in the outline's colour), so the mask is exactly the pixels the shape painted
        ImageDraw.Draw(mask_img).polygon(pts, fill=255, outline=128 if outline else None)
        ImageDraw.Draw(canvas).polygon(pts, fill=COLOURS[colour], outline=(0, 0, 0) if outline else None)
        mask = np.asarray(mask_img) > 0
        for o in objects:  # the new shape hides what it covers
            o["mask"] &= ~mask
        size_word = "large" if r > 0.22 * size else "small" if r < 0.16 * size else ""
        objects.append(dict(shape=shape, colour=colour, mask=mask, outline=outline, size_word=size_word, cx=cx))
    return np.asarray(canvas), [o for o in objects if o["mask"].any()], bg


def object_caption(o: dict, size: int) -> str:
    words = ["a"] + ([o["size_word"]] if o["size_word"] else []) + [o["colour"], o["shape"]]
    if o["outline"]:
        words += ["with a thin black outline"]
    words += ["on the left" if o["cx"] < size / 3 else "on the right" if o["cx"] > 2 * size / 3 else "in the middle"]
    return " ".join(words)


def scene_caption(objects, bg: str) -> str:
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listing} on a {bg} background"


def write_dataset(out: str, num_scenes: int = 500, size: int = 64, seed: int = 0, num_text_pairs: int = None,
                  progress: bool = False) -> dict:
    """Write the set (see module doc). Returns the paths written."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": []}
    categories = {}
    captions = []
    ann_id = 1
    for i in range(num_scenes):
        img, objects, _ = render_scene(rng, size)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(out, "images", name))
        coco["images"].append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for o in objects:
            label = f"{o['colour']} {o['shape']}"
            cat = categories.setdefault(label, len(categories) + 1)
            rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
            x0, y0, w, h = (float(v) for v in mask_utils.toBbox(rle))
            coco["annotations"].append({"id": ann_id, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                        "area": float(o["mask"].sum()), "bbox": [x0, y0, w, h]})
            captions.append({"annotation_id": ann_id, "caption": object_caption(o, size)})
            ann_id += 1
        if progress and (i + 1) % 500 == 0:
            print(f"  synthetic: {i + 1}/{num_scenes} scenes", file=sys.stderr)
    coco["categories"] = [{"id": v, "name": k} for k, v in categories.items()]
    paths = {"annotations": os.path.join(out, "annotations.json"), "images": os.path.join(out, "images"),
             "captions": os.path.join(out, "captions.jsonl"), "image_text": os.path.join(out, "image_text-00000.tar")}
    with open(paths["annotations"], "w") as f:
        json.dump(coco, f)
    with open(paths["captions"], "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in captions)
    n_text = num_text_pairs if num_text_pairs is not None else max(1, num_scenes // 4)
    with tarfile.open(paths["image_text"], "w") as tar:
        for j in range(n_text):
            img, objects, bg = render_scene(rng, size)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            _add(tar, f"{j:06d}.jpg", buf.getvalue())
            _add(tar, f"{j:06d}.txt", scene_caption(objects, bg).encode())
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def is_synthetic_set(folder: str) -> bool:
    """A folder `write_dataset` made (what `--overwrite` may replace)."""
    return all(os.path.exists(os.path.join(folder, n)) for n in ("annotations.json", "images", "captions.jsonl",
                                                                 "image_text-00000.tar"))


# ------------------------------------------------------------------------- the set in a run
VOCABULARY = list(COLOURS) + list(SHAPES) + ["a", "small", "large", "with", "thin", "black", "outline", "on", "the",
                                             "left", "right", "in", "middle", "and", "background"] + list(BACKGROUNDS)


def run_set_dirs(workdir: str) -> dict:
    """Where a run keeps its shapes set (module doc)."""
    root = os.path.join(workdir, "data")
    return {name: os.path.join(root, name) for name in
            ("raw_train", "raw_heldout", "prepared", "heldout", "tokenizer", "READY")}


def build_run_set(workdir: str, num_scenes: int, size: int) -> dict:
    """Write and prepare the shapes set of a run (module doc), unless `READY` says it was
    built already (a resumed run). Returns `run_set_dirs(workdir)`."""
    from smartbrush_jax.data.prepare import prepare
    from smartbrush_jax.data.sources import CocoSource, WebdatasetSource, read_captions
    from smartbrush_jax.models.tokenizer import write_word_tokenizer
    from smartbrush_jax.outputs import building
    from smartbrush_jax.settings import DataConfig

    dirs = run_set_dirs(workdir)
    if os.path.isfile(dirs["READY"]):
        return dirs
    print(f"building the synthetic shapes set: {num_scenes} scenes at {size}px in {os.path.dirname(dirs['READY'])}",
          file=sys.stderr)
    for name, scenes, seed in (("train", num_scenes, 0), ("heldout", max(8, num_scenes // 20), 1)):
        raw = write_dataset(dirs[f"raw_{name}"], scenes, size, seed)
        sources = {"coco": CocoSource(raw["annotations"], raw["images"], min_mask_area=0.01,
                                      captions=read_captions(raw["captions"])),
                   "webdataset": WebdatasetSource([raw["image_text"]])}
        with building(dirs["prepared" if name == "train" else "heldout"]) as tmp:  # replaces an interrupted build
            prepare(tmp, sources, workers=1, progress=False,  # in this process: no fork of a JAX process
                    extra_meta={"min_mask_area": 0.01, "max_pixels": DataConfig.max_pixels})
    write_word_tokenizer(dirs["tokenizer"], [" ".join(VOCABULARY)])
    open(dirs["READY"], "w").close()
    return dirs


def other_colour(label: str) -> str:
    """The prompt the demo asks for: the same shape in another colour ("red star" -> "a green star")."""
    colour, shape = label.split(" ", 1)
    names = list(COLOURS)
    return f"a {names[(names.index(colour) + 3) % len(names)]} {shape}"


def has_heldout(workdir: str) -> bool:
    return os.path.isfile(os.path.join(run_set_dirs(workdir)["raw_heldout"], "annotations.json"))


def heldout_scenes(workdir: str, n: int):
    """The first `n` held-out objects of a run on the shapes set (those of at least 6% of
    their image): [(image path, exact mask [H, W] bool, prompt asking for the shape in
    another colour)]. InputError when the run has no held-out set."""
    from pycocotools import mask as mu

    from smartbrush_jax.errors import InputError

    raw = run_set_dirs(workdir)["raw_heldout"]
    if not has_heldout(workdir):
        raise InputError(f"{raw}/annotations.json missing: train the demo first (make demo)")
    with open(os.path.join(raw, "annotations.json")) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    anns = [a for a in coco["annotations"]
            if a["area"] >= 0.06 * images[a["image_id"]]["height"] * images[a["image_id"]]["width"]][:n]
    return [(os.path.join(raw, "images", images[a["image_id"]]["file_name"]),
             mu.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())).astype(bool),
             other_colour(names[a["category_id"]])) for a in anns]
