"""Evaluation sets for `eval/fid.py`: (image, object mask, prompt) triplets from prepared
records (`smartbrush-prepare` output: segmentation records of COCO/OpenImages) or from a
CSV with columns `image,mask,prompt` (paths relative to the CSV; masks are images where
non-zero = object). Items are read lazily; the whole set is checked up front, so a
missing file is reported before hours of generation, not in the middle of them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Iterator, List, Optional

import numpy as np
from PIL import Image

from .errors import MetricsError


@dataclasses.dataclass
class EvalItem:
    key: str  # stable id: names the cached generations
    image: np.ndarray  # [H,W,3] uint8
    mask: np.ndarray  # [H,W] bool, the object's exact mask
    prompt: str


class EvalSet:
    """`len()` items, `items()` yields `EvalItem`s in a fixed order."""

    def __init__(self, path: str, limit: Optional[int] = None, prompt_field: str = "label",
                 min_mask_pixels: int = 16):
        self.path, self.prompt_field, self.min_mask_pixels = path, prompt_field, min_mask_pixels
        if os.path.isfile(path) and path.endswith(".csv"):
            self._rows = _read_csv(path)
            self.kind = "csv"
        elif os.path.isdir(path):
            self._rows = _record_rows(path)
            self.kind = "records"
        else:
            raise MetricsError(f"evaluation set {path!r} not found: pass a prepared records folder "
                               "(smartbrush-prepare output, with metadata.json) or a CSV of image,mask,prompt")
        if limit is not None:
            self._rows = self._rows[:limit]
        if not self._rows:
            raise MetricsError(f"{path}: the evaluation set is empty")

    def __len__(self) -> int:
        return len(self._rows)

    def items(self) -> Iterator[EvalItem]:
        for row in self._rows:
            item = self._load_csv(row) if self.kind == "csv" else self._load_record(row)
            if item.mask.sum() < self.min_mask_pixels:
                raise MetricsError(f"{self.path}: item {item.key}: the mask has {int(item.mask.sum())} pixels "
                                   f"(< {self.min_mask_pixels}); remove it from the evaluation set")
            yield item

    def _load_csv(self, row) -> EvalItem:
        n, image_path, mask_path, prompt = row
        try:
            image = np.asarray(Image.open(image_path).convert("RGB"))
            mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        except OSError as e:
            raise MetricsError(f"{self.path} row {n}: cannot read the image or mask ({e})") from e
        if mask.shape != image.shape[:2]:
            raise MetricsError(f"{self.path} row {n}: mask {mask.shape} and image {image.shape[:2]} differ in size")
        return EvalItem(f"{n:06d}", image, mask, prompt)

    def _load_record(self, row) -> EvalItem:
        from smartbrush_jax.data.records import decode_mask, unpack_record
        from smartbrush_jax.data.validate import Skip, decode_image

        n, rec = row
        try:
            fields = unpack_record(rec)
            image = decode_image(fields["image"])
            mask = decode_mask(fields["mask"])
        except (Skip, KeyError, ValueError) as e:
            raise MetricsError(f"{self.path}: record {n} is unreadable ({e})") from e
        prompt = fields.get(self.prompt_field) or fields.get("label") or fields.get("caption")
        if not prompt:
            raise MetricsError(f"{self.path}: record {n} has no {self.prompt_field!r} to use as the prompt")
        return EvalItem(f"{n:06d}", image, mask, str(prompt))


def _read_csv(path: str) -> List[tuple]:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing_cols = {"image", "mask", "prompt"} - set(reader.fieldnames or ())
        if missing_cols:
            raise MetricsError(f"{path}: the CSV needs the columns image,mask,prompt; missing {sorted(missing_cols)}")
        rows, missing = [], []
        for n, r in enumerate(reader):
            paths = [os.path.join(root, r[c]) for c in ("image", "mask")]
            missing += [f"row {n}: {p}" for p in paths if not os.path.isfile(p)]
            if not (r["prompt"] or "").strip():
                raise MetricsError(f"{path} row {n}: empty prompt")
            rows.append((n, *paths, r["prompt"].strip()))
    if missing:
        more = f" ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MetricsError(f"{path}: {len(missing)} files are missing: {'; '.join(missing[:5])}{more}")
    return rows


def _record_rows(folder: str) -> List[tuple]:
    """(index, record bytes) of the segmentation records of a prepared folder."""
    from array_record.python.array_record_module import ArrayRecordReader

    meta_path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(meta_path):
        raise MetricsError(f"{folder}: no metadata.json: not a prepared records folder (run smartbrush-prepare)")
    with open(meta_path) as f:
        meta = json.load(f)
    files = meta.get("components", {}).get("seg", {}).get("files", [])
    rows = []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise MetricsError(f"{folder}: {name} is listed in metadata.json but missing")
        reader = ArrayRecordReader(path)
        try:
            rows += [(len(rows) + i, r) for i, r in enumerate(reader.read_all())]
        finally:
            reader.close()
    return rows
