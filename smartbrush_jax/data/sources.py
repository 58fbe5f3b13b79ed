"""Readers for the formats users have on disk. Each yields `RawExample`s and counts what
it skips (reasons in `validate.SKIP_REASONS`, plus `crowd` for COCO crowd annotations).

- COCO instances JSON + image folder (polygon and RLE masks; category names as labels)
- OpenImages v6 segmentation: the `*-annotations-object-segmentation.csv`, the mask PNG
  folders, `oidv6-class-descriptions.csv`, the image folder
- image-text shards as img2dataset writes them (webdataset `.tar`: `.jpg` + `.txt`/`.json`)
- a captions side-file (JSONL: `{"annotation_id": ..., "caption": ...}`)

What a whole input can get wrong is checked before any work (`load_coco`,
`check_openimages`, `read_captions`): an `InputError`. What goes wrong inside one (a
record, a line, a tar that ends early) is counted and the rest is read.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
import tarfile
import zlib
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from smartbrush_jax.box import Box
from smartbrush_jax.data.coco_entries import sort_entries
from smartbrush_jax.data.validate import Counter, Skip, check_box, check_caption, check_mask, decode_image
from smartbrush_jax.errors import InputError

# webdataset members read at all: images, and the caption in .txt or .json
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
_TEXT_EXT = (".txt", ".json")
MAX_IMAGE_BYTES = 64 * 2**20  # an image member larger than this is not read (oversized_file)
MAX_TEXT_BYTES = 2**20


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
    """The mask's `Box` as a record stores it: [x0, y0, x1, y1]."""
    return list(Box.of_mask(mask))


def read_captions(path: Optional[str], counts: Optional[Counter] = None) -> Dict[str, str]:
    """JSONL `{"annotation_id": id, "caption": text}` -> {str(id): caption}. Such files come
    from other tools and run to millions of lines: a line that is not UTF-8 or not such an
    object is counted as `bad_caption` (in `counts`) and skipped. A file of which no line
    is a caption is not a captions file: InputError."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise InputError(f"--captions {path}: no such file")
    out, bad, first_bad = {}, 0, None
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(check_caption(line))
                out[str(row["annotation_id"])] = check_caption(row["caption"])
            except (ValueError, KeyError, TypeError, Skip) as e:
                bad += 1
                first_bad = first_bad or f"{path}:{n}: not a caption line ({e})"
    if bad and not out:
        raise InputError(f"{first_bad}; no line of --captions {path} is a JSON object with annotation_id and caption")
    if counts is not None and bad:
        counts["bad_caption"] += bad
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


def load_coco(path: str) -> dict:
    """The COCO instances JSON, checked: InputError for a file that is not one."""
    try:
        with open(path, "rb") as f:
            coco = json.load(f)
    except OSError as e:
        raise InputError(f"--coco-annotations {path}: cannot read it ({e})") from None
    except ValueError as e:
        raise InputError(f"--coco-annotations {path}: not JSON ({e})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or \
            not isinstance(coco.get("annotations"), list):
        raise InputError(f"--coco-annotations {path}: not a COCO instances file (needs 'images' and "
                         "'annotations' lists)")
    return coco


class CocoSource:
    """COCO instances: one example per non-crowd instance annotation, in (image, annotation)
    order; work units of `images_per_unit` images (an image's annotations stay in one unit,
    so it is decoded once). `annotations`: the JSON's path or what `load_coco` returned."""

    def __init__(self, annotations, image_dir: str, min_mask_area: float = 0.01,
                 captions: Optional[Dict[str, str]] = None, max_pixels: int = 8192 * 8192, source: str = "coco",
                 images_per_unit: int = 64):
        coco = load_coco(annotations) if isinstance(annotations, str) else annotations
        self.image_dir, self.min_mask_area, self.max_pixels, self.source = image_dir, min_mask_area, max_pixels, source
        self.captions = captions or {}
        # entries of the wrong type (an id that is a list, `categories` a number) are counted, not a TypeError
        self.images, self.names, anns, self.plan_counts = sort_entries(coco)
        self.groups = []  # [(image id, [annotations])] in order
        for ann in sorted(anns, key=lambda a: (_sortable(a["image_id"]), _sortable(a["id"]))):
            if not self.groups or self.groups[-1][0] != ann["image_id"]:
                self.groups.append((ann["image_id"], []))
            self.groups[-1][1].append(ann)
        self.per_unit = max(1, images_per_unit)

    def units(self) -> list:
        return [(i, min(i + self.per_unit, len(self.groups))) for i in range(0, len(self.groups), self.per_unit)]

    def read(self, unit, counts: Counter) -> Iterator[RawExample]:
        from pycocotools import mask as mask_utils

        cache = _ImageCache(self.max_pixels, counts)
        for _, anns in self.groups[unit[0]:unit[1]]:
            for ann in anns:
                example = self._example(ann, cache, counts, mask_utils)
                if example is not None:
                    yield example

    def _example(self, ann, cache, counts, mask_utils) -> Optional[RawExample]:
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            return None
        try:
            info = self.images.get(ann["image_id"])
            if info is None:
                raise Skip("missing_file", f"image id {ann['image_id']} not in the JSON")
            data, image = cache.get(str(info["id"]), os.path.join(self.image_dir, info["file_name"]))
            h, w = image.shape[:2]
            if (info.get("height", h), info.get("width", w)) != (h, w):
                raise Skip("mask_outside", f"JSON says {info['width']}x{info['height']}, file is {w}x{h}")
            if "segmentation" not in ann:
                raise Skip("empty_mask", "no segmentation")
            mask = _coco_mask(ann["segmentation"], h, w, mask_utils)
            if "bbox" in ann:
                bx, by, bw, bh = ann["bbox"]
                check_box([bx, by, bx + bw, by + bh], w, h)
            mask = check_mask(mask, (h, w), self.min_mask_area)
            return RawExample(id=f"{self.source}:{ann['id']}", source=self.source, kind="seg", image_bytes=data,
                              image=image, mask=mask, label=str(self.names.get(ann.get("category_id"), "")),
                              caption=self.captions.get(str(ann["id"]), ""), box=mask_box(mask))
        except Skip as e:
            counts[e.reason] += 1
        except (KeyError, TypeError, ValueError, IndexError):  # a malformed annotation (written by another tool)
            counts["corrupt_record"] += 1
        return None


def read_all(source, counts: Counter) -> Iterator[RawExample]:
    """Every example of a source (all its units, in order), counting into `counts`."""
    counts.update(getattr(source, "plan_counts", {}))
    for unit in source.units():
        yield from source.read(unit, counts)


def read_coco(annotations, image_dir: str, counts: Counter, min_mask_area: float = 0.01,
              captions: Optional[Dict[str, str]] = None, max_pixels: int = 8192 * 8192,
              source: str = "coco") -> Iterator[RawExample]:
    """Every example of a COCO instances file (see CocoSource)."""
    return read_all(CocoSource(annotations, image_dir, min_mask_area, captions, max_pixels, source), counts)


def _sortable(v):
    """Numbers in order, then anything else by its text (ids written by other tools)."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _coco_mask(segm, h: int, w: int, mask_utils) -> np.ndarray:
    """The annotation's mask, from polygons or RLE checked first: pycocotools' C code trusts
    its input (a coordinate of 1e308 segfaults it, one of 1e10 allocates gigabytes, RLE
    counts that overrun the image write past its buffer), so such an annotation is a
    counted `bad_polygon` before pycocotools sees it."""
    if isinstance(segm, list):  # polygons
        polys = [_polygon(p, h, w) for p in segm]
        polys = [p for p in polys if len(p) >= 6]
        if not polys:
            raise Skip("empty_mask", "no polygon with 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        _check_rle_size(segm, h, w)
        _check_rle_counts(segm["counts"], h, w)
        rle = mask_utils.frPyObjects(segm, h, w)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):  # compressed RLE
        _check_rle_size(segm, h, w)
        counts = segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"]
        _check_rle_counts(rle_string_counts(counts), h, w)
        rle = dict(segm, counts=counts)
    elif isinstance(segm, dict):
        raise Skip("bad_polygon", f"RLE counts of type {type(segm.get('counts')).__name__}")
    else:
        raise Skip("empty_mask", "no segmentation")
    return mask_utils.decode(rle).astype(bool)


def _polygon(points, h: int, w: int) -> list:
    """[x0, y0, x1, y1, ...] as floats, each point finite and within the image grown by its
    own size on every side (real files stray a few pixels past the border, never further)."""
    if not isinstance(points, (list, tuple)) or len(points) % 2:
        raise Skip("bad_polygon", "a polygon is a flat list of x, y pairs")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in points):
        raise Skip("bad_polygon", "a polygon coordinate that is not a number")
    xy = np.asarray(points, np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        raise Skip("bad_polygon", "a polygon coordinate that is NaN or infinite")
    if (xy[:, 0] < -w).any() or (xy[:, 0] > 2 * w).any() or (xy[:, 1] < -h).any() or (xy[:, 1] > 2 * h).any():
        raise Skip("bad_polygon", f"a polygon point far outside the {w}x{h} image")
    return [float(v) for v in points]


def _check_rle_size(segm: dict, h: int, w: int) -> None:
    size = segm.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise Skip("bad_polygon", f"RLE size {size!r} is not [height, width]")
    if tuple(size) != (h, w):
        raise Skip("mask_outside", f"RLE size {size} vs image {h}x{w}")


def _check_rle_counts(counts, h: int, w: int) -> None:
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise Skip("bad_polygon", "RLE counts are non-negative integers")
    if sum(counts) != h * w:
        raise Skip("bad_polygon", f"RLE counts cover {sum(counts)} pixels, the image has {h * w}")


def rle_string_counts(s: bytes) -> list:
    """The run lengths of COCO's compressed RLE string: each count in 5-bit groups (6 bits a
    character, offset 48, bit 5 = more groups follow, bit 4 of the last = negative), every
    count after the second stored as the difference to the one two before it. Skip for a
    string that does not decode."""
    counts, i = [], 0
    while i < len(s):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(s):
                raise Skip("bad_polygon", "a compressed RLE string that ends inside a count")
            c = s[i] - 48
            if not 0 <= c < 64:
                raise Skip("bad_polygon", "a compressed RLE string with a character outside its alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
            if shift > 64:
                raise Skip("bad_polygon", "a compressed RLE count too long")
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


OPENIMAGES_COLUMNS = ("ImageID", "MaskPath", "LabelName")


def check_openimages(annotations_csv: str, classes_csv: str) -> None:
    """InputError unless the segmentation CSV has OpenImages' columns and the class
    descriptions CSV is readable: checked before any work, not after a whole COCO pass."""
    try:
        with open(annotations_csv, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--openimages-csv {annotations_csv}: cannot read it ({e})") from None
    missing = [c for c in OPENIMAGES_COLUMNS if c not in header]
    if missing:
        raise InputError(f"--openimages-csv {annotations_csv}: not an OpenImages segmentation CSV (no column "
                         f"{', '.join(missing)}; its header is {header[:6]})")
    try:
        _read_classes(classes_csv)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--openimages-classes {classes_csv}: cannot read it ({e})") from None


class OpenImagesSource:
    """OpenImages v6 segmentation: one example per row of the CSV, in (image, mask) order;
    work units of `images_per_unit` images. Mask PNGs are looked up under `masks_dir`
    (directly or in its sub-folders, as the per-prefix zips unpack); a mask of another size
    than its image is resized to it (nearest neighbour)."""

    def __init__(self, annotations_csv: str, masks_dir: str, images_dir: str, classes_csv: str,
                 min_mask_area: float = 0.01, captions: Optional[Dict[str, str]] = None,
                 max_pixels: int = 8192 * 8192, images_per_unit: int = 64):
        check_openimages(annotations_csv, classes_csv)
        self.classes = _read_classes(classes_csv)
        self.mask_index = {}
        for root, _, files in os.walk(masks_dir):
            for f in files:
                self.mask_index.setdefault(f, os.path.join(root, f))
        self.images_dir, self.min_mask_area, self.max_pixels = images_dir, min_mask_area, max_pixels
        self.captions = captions or {}
        with open(annotations_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        good = [r for r in rows if all(r.get(c) for c in OPENIMAGES_COLUMNS)]
        self.plan_counts = Counter()
        if len(good) < len(rows):  # a short or empty row: nothing to look the mask up by
            self.plan_counts["corrupt_record"] += len(rows) - len(good)
        self.groups = []
        for row in sorted(good, key=lambda r: (r["ImageID"], r["MaskPath"])):
            if not self.groups or self.groups[-1][0] != row["ImageID"]:
                self.groups.append((row["ImageID"], []))
            self.groups[-1][1].append(row)
        self.per_unit = max(1, images_per_unit)

    def units(self) -> list:
        return [(i, min(i + self.per_unit, len(self.groups))) for i in range(0, len(self.groups), self.per_unit)]

    def read(self, unit, counts: Counter) -> Iterator[RawExample]:
        cache = _ImageCache(self.max_pixels, counts)
        for _, rows in self.groups[unit[0]:unit[1]]:
            for row in rows:
                try:
                    yield self._example(row, cache, counts)
                except Skip as e:
                    counts[e.reason] += 1

    def _example(self, row, cache, counts) -> RawExample:
        data, image = cache.get(row["ImageID"], os.path.join(self.images_dir, row["ImageID"] + ".jpg"))
        h, w = image.shape[:2]
        path = self.mask_index.get(os.path.basename(row["MaskPath"]))
        if path is None:
            raise Skip("missing_file", row["MaskPath"])
        try:
            with Image.open(path) as im:
                m = im.convert("L")
                if m.size != (w, h):
                    counts["converted_mask_resize"] += 1
                    m = m.resize((w, h), Image.Resampling.NEAREST)
                mask = np.asarray(m) > 127
        except Exception as e:  # PIL: UnidentifiedImageError, OSError, DecompressionBombError, ...
            raise Skip("corrupt_image", f"{path}: {e}") from None
        if all(row.get(k) for k in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")):
            try:
                box = [float(row["BoxXMin"]) * w, float(row["BoxYMin"]) * h,
                       float(row["BoxXMax"]) * w, float(row["BoxYMax"]) * h]
            except ValueError:
                raise Skip("mask_outside", f"box {row['BoxXMin']}, ... is not a number") from None
            check_box(box, w, h)
        mask = check_mask(mask, (h, w), self.min_mask_area)
        ann_id = os.path.splitext(os.path.basename(row["MaskPath"]))[0]
        return RawExample(id=f"openimages:{ann_id}", source="openimages", kind="seg", image_bytes=data,
                          image=image, mask=mask, label=self.classes.get(row["LabelName"], row["LabelName"]),
                          caption=self.captions.get(ann_id, ""), box=mask_box(mask))


def read_openimages(annotations_csv: str, masks_dir: str, images_dir: str, classes_csv: str, counts: Counter,
                    min_mask_area: float = 0.01, captions: Optional[Dict[str, str]] = None,
                    max_pixels: int = 8192 * 8192) -> Iterator[RawExample]:
    """Every example of an OpenImages segmentation CSV (see OpenImagesSource)."""
    return read_all(OpenImagesSource(annotations_csv, masks_dir, images_dir, classes_csv, min_mask_area, captions,
                                     max_pixels), counts)


def _read_classes(path: str) -> Dict[str, str]:
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0] != "LabelName":
                out[row[0]] = row[1]
    return out


class WebdatasetSource:
    """Image-text pairs from img2dataset-style tars, by webdataset's rules: members whose
    key (folder + file name up to the name's first dot) is the same form one sample
    (`./00001.jpg` + `./00001.txt`; `shard.v2/00001.jpg` is key `shard.v2/00001`); folders
    are skipped. Only the image and the `.txt` / `.json` caption are read, each bounded in
    size (`oversized_file` beyond). A sample without a caption is skipped and counted
    (`no_caption`): an image-text pair without text teaches the text conditioning nothing.
    A shard that cannot be opened or ends early (a truncated `.tar` or `.tar.gz`) is counted
    `corrupt_shard`; the samples read before the break are kept. One work unit per tar."""

    def __init__(self, tars: Sequence[str], max_pixels: int = 8192 * 8192, source: str = "laion",
                 max_image_bytes: int = MAX_IMAGE_BYTES):
        self.tars, self.max_pixels, self.source, self.max_image_bytes = list(tars), max_pixels, source, max_image_bytes

    def units(self) -> list:
        return list(range(len(self.tars)))

    def read(self, unit, counts: Counter) -> Iterator[RawExample]:
        path, max_pixels, source = self.tars[unit], self.max_pixels, self.source
        try:
            tar = tarfile.open(path)
        except (OSError, EOFError, tarfile.TarError):
            counts["corrupt_shard"] += 1
            return
        with tar:
            group, key = {}, None
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _wds_key(member.name)
                    if key is not None and k != key:
                        yield from _wds_example(group, key, path, counts, max_pixels, source)
                        group = {}
                    key = k
                    if ext in _IMAGE_EXT or ext in _TEXT_EXT:
                        limit = self.max_image_bytes if ext in _IMAGE_EXT else MAX_TEXT_BYTES
                        group[ext] = _TOO_LARGE if member.size > limit else tar.extractfile(member).read()
            except (OSError, EOFError, tarfile.TarError, zlib.error):
                counts["corrupt_shard"] += 1  # the sample being read when the shard broke is dropped
                return
            if key is not None:
                yield from _wds_example(group, key, path, counts, max_pixels, source)


def read_webdataset(tars: Sequence[str], counts: Counter, max_pixels: int = 8192 * 8192,
                    source: str = "laion", max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[RawExample]:
    """Every example of webdataset tars (see WebdatasetSource)."""
    return read_all(WebdatasetSource(tars, max_pixels, source, max_image_bytes), counts)


_TOO_LARGE = object()


def _wds_key(name: str):
    """webdataset's split of a member path: (folder/name up to the name's first dot, .ext)."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(folder, stem) if folder not in ("", ".") else stem
    return key, ("." + ext.lower()) if dot else ""


def _wds_example(group, key, path, counts, max_pixels, source):
    try:
        img_ext = next((e for e in _IMAGE_EXT if e in group), None)
        if img_ext is None:
            raise Skip("missing_file", f"{path}:{key} has no image")
        if any(v is _TOO_LARGE for v in group.values()):
            raise Skip("oversized_file", f"{path}:{key}")
        caption = ""
        if ".txt" in group:
            caption = check_caption(group[".txt"])
        elif ".json" in group:
            try:
                meta = json.loads(check_caption(group[".json"]))
            except ValueError as e:
                raise Skip("bad_caption", str(e)) from None
            if not isinstance(meta, dict):
                raise Skip("bad_caption", f"{path}:{key}.json is not a JSON object")
            caption = check_caption(meta.get("caption", ""))
        if not caption:
            raise Skip("no_caption", f"{path}:{key}")
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
