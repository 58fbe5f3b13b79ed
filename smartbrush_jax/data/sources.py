"""Readers for the formats users have on disk. Each yields `RawExample`s and counts what
it skips (reasons in `validate.SKIP_REASONS`, plus `crowd` for COCO crowd annotations).

- COCO instances JSON + image folder (polygon and RLE masks; category names as labels)
- OpenImages v6 segmentation: the `*-annotations-object-segmentation.csv`, the mask PNG
  folders, `oidv6-class-descriptions.csv`, the image folder
- image-text shards as img2dataset writes them (webdataset `.tar`: `.jpg` + `.txt`/`.json`)
- a captions side-file (JSONL: `{"annotation_id": ..., "caption": ...}`)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tarfile
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from smartbrush_jax.data.validate import Counter, Skip, check_box, check_caption, check_mask, decode_image


@dataclasses.dataclass
class RawExample:
    id: str
    source: str
    kind: str  # "seg" (object mask) or "t2i" (image-text, whole-image mask)
    image_bytes: bytes
    image: np.ndarray  # decoded RGB uint8 [H, W, 3], validated
    mask: Optional[np.ndarray] = None  # bool [H, W]
    label: str = ""
    caption: str = ""
    box: Optional[list] = None  # [x0, y0, x1, y1] of the mask, pixels, exclusive ends


def mask_box(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def read_captions(path: Optional[str]) -> Dict[str, str]:
    """JSONL `{"annotation_id": id, "caption": text}` -> {str(id): caption}."""
    if not path:
        return {}
    out = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["annotation_id"])] = check_caption(row["caption"])
            except (ValueError, KeyError, Skip) as e:
                raise ValueError(f"{path}:{n}: not a caption line ({e})") from None
    return out


class _ImageCache:
    """Annotations of one image come together: decode each image once."""

    def __init__(self, max_pixels: int, counts: Counter):
        self.key, self.value, self.max_pixels, self.counts = None, None, max_pixels, counts

    def get(self, key: str, path: str):
        if key != self.key:
            self.key = key
            try:
                with open(path, "rb") as f:
                    data = f.read()
                self.value = (data, decode_image(data, self.max_pixels, self.counts))
            except FileNotFoundError:
                self.value = Skip("missing_file", path)
            except Skip as e:
                self.value = e
        if isinstance(self.value, Skip):
            raise self.value
        return self.value


def read_coco(annotations: str, image_dir: str, counts: Counter, min_mask_area: float = 0.01,
              captions: Optional[Dict[str, str]] = None, max_pixels: int = 8192 * 8192,
              source: str = "coco") -> Iterator[RawExample]:
    """One example per non-crowd instance annotation."""
    from pycocotools import mask as mask_utils

    with open(annotations) as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    captions = captions or {}
    cache = _ImageCache(max_pixels, counts)
    for ann in sorted(coco["annotations"], key=lambda a: (a["image_id"], a["id"])):
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        try:
            info = images.get(ann["image_id"])
            if info is None:
                raise Skip("missing_file", f"image id {ann['image_id']} not in the JSON")
            data, image = cache.get(str(info["id"]), os.path.join(image_dir, info["file_name"]))
            h, w = image.shape[:2]
            if (info.get("height", h), info.get("width", w)) != (h, w):
                raise Skip("mask_outside", f"JSON says {info['width']}x{info['height']}, file is {w}x{h}")
            mask = _coco_mask(ann["segmentation"], h, w, mask_utils)
            if "bbox" in ann:
                bx, by, bw, bh = ann["bbox"]
                check_box([bx, by, bx + bw, by + bh], w, h)
            mask = check_mask(mask, (h, w), min_mask_area)
            yield RawExample(id=f"{source}:{ann['id']}", source=source, kind="seg", image_bytes=data, image=image,
                             mask=mask, label=names.get(ann["category_id"], ""),
                             caption=captions.get(str(ann["id"]), ""), box=mask_box(mask))
        except Skip as e:
            counts[e.reason] += 1


def _coco_mask(segm, h: int, w: int, mask_utils) -> np.ndarray:
    if isinstance(segm, list):  # polygons
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            raise Skip("empty_mask", "no polygon with 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        if tuple(segm["size"]) != (h, w):
            raise Skip("mask_outside", f"RLE size {segm['size']} vs image {h}x{w}")
        rle = mask_utils.frPyObjects(segm, h, w)
    elif isinstance(segm, dict):  # compressed RLE
        if tuple(segm["size"]) != (h, w):
            raise Skip("mask_outside", f"RLE size {segm['size']} vs image {h}x{w}")
        rle = dict(segm, counts=segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"])
    else:
        raise Skip("empty_mask", "no segmentation")
    return mask_utils.decode(rle).astype(bool)


def read_openimages(annotations_csv: str, masks_dir: str, images_dir: str, classes_csv: str, counts: Counter,
                    min_mask_area: float = 0.01, captions: Optional[Dict[str, str]] = None,
                    max_pixels: int = 8192 * 8192) -> Iterator[RawExample]:
    """One example per row of the segmentation CSV. Mask PNGs are looked up under
    `masks_dir` (directly or in its sub-folders, as the per-prefix zips unpack); a mask of
    another size than its image is resized to it (nearest neighbour)."""
    classes = _read_classes(classes_csv)
    mask_index = {}
    for root, _, files in os.walk(masks_dir):
        for f in files:
            mask_index.setdefault(f, os.path.join(root, f))
    captions = captions or {}
    cache = _ImageCache(max_pixels, counts)
    with open(annotations_csv, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (r["ImageID"], r["MaskPath"]))
    for row in rows:
        try:
            data, image = cache.get(row["ImageID"], os.path.join(images_dir, row["ImageID"] + ".jpg"))
            h, w = image.shape[:2]
            path = mask_index.get(os.path.basename(row["MaskPath"]))
            if path is None:
                raise Skip("missing_file", row["MaskPath"])
            try:
                with Image.open(path) as im:
                    m = im.convert("L")
                    if m.size != (w, h):
                        counts["converted_mask_resize"] += 1
                        m = m.resize((w, h), Image.Resampling.NEAREST)
                    mask = np.asarray(m) > 127
            except OSError as e:
                raise Skip("corrupt_image", f"{path}: {e}") from None
            if all(k in row for k in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")):
                box = [float(row["BoxXMin"]) * w, float(row["BoxYMin"]) * h,
                       float(row["BoxXMax"]) * w, float(row["BoxYMax"]) * h]
                check_box(box, w, h)
            mask = check_mask(mask, (h, w), min_mask_area)
            ann_id = os.path.splitext(os.path.basename(row["MaskPath"]))[0]
            yield RawExample(id=f"openimages:{ann_id}", source="openimages", kind="seg", image_bytes=data,
                             image=image, mask=mask, label=classes.get(row["LabelName"], row["LabelName"]),
                             caption=captions.get(ann_id, ""), box=mask_box(mask))
        except Skip as e:
            counts[e.reason] += 1


def _read_classes(path: str) -> Dict[str, str]:
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0] != "LabelName":
                out[row[0]] = row[1]
    return out


_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


def read_webdataset(tars: Sequence[str], counts: Counter, max_pixels: int = 8192 * 8192,
                    source: str = "laion") -> Iterator[RawExample]:
    """Image-text pairs from img2dataset-style tars: members sharing a key (`00001.jpg`,
    `00001.txt` / `00001.json` with a `caption` field) form one example."""
    for path in tars:
        try:
            tar = tarfile.open(path)
        except (OSError, tarfile.TarError):
            counts["corrupt_record"] += 1
            continue
        with tar:
            group, key = {}, None
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    yield from _wds_example(group, key, path, counts, max_pixels, source)
                    group = {}
                key = k
                group["." + ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield from _wds_example(group, key, path, counts, max_pixels, source)


def _wds_example(group, key, path, counts, max_pixels, source):
    try:
        img_ext = next((e for e in _IMAGE_EXT if e in group), None)
        if img_ext is None:
            raise Skip("missing_file", f"{path}:{key} has no image")
        if ".txt" in group:
            caption = check_caption(group[".txt"])
        elif ".json" in group:
            try:
                caption = check_caption(json.loads(check_caption(group[".json"])).get("caption", ""))
            except ValueError as e:
                raise Skip("bad_caption", str(e)) from None
        else:
            caption = ""
        data = group[img_ext]
        image = decode_image(data, max_pixels, counts)
        yield RawExample(id=f"{source}:{os.path.basename(path)}:{key}", source=source, kind="t2i", image_bytes=data,
                         image=image, caption=caption)
    except Skip as e:
        counts[e.reason] += 1


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
