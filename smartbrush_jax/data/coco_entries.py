"""The entries of a COCO instances file, sorted into those `prepare` can use and those it
counts: files written by other tools get types wrong (an image id that is a list, a
category id that is an object, `categories` that is a number, a `bbox` that is text, an
`iscrowd` that is a list), and each such entry was a `TypeError` traceback that ended the
whole run. Now each is counted `bad_coco_entry` and left out, and the rest is prepared. What
makes the whole file unusable (it is not an object, `images` or `annotations` is not a list)
is `load_coco`'s one-line refusal.

    sort_entries(coco) -> (images {id: entry}, names {category id: name}, annotations, counts)
"""

from __future__ import annotations

import math
from typing import Optional

from smartbrush_jax.data.validate import Counter

BAD = "bad_coco_entry"


def is_id(value) -> bool:
    """An id as COCO files write them: an integer or a string (or a finite float, from a tool
    that went through a float column); never a bool, null, list or object."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (int, str))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_problem(ann: dict) -> Optional[str]:
    """Why an annotation (a dict with `id` and `image_id`) cannot be used, or None."""
    for key in ("id", "image_id"):
        if not is_id(ann[key]):
            return f"{key} {ann[key]!r:.40} is not an integer or a string"
    category = ann.get("category_id")
    if category is not None and not is_id(category):
        return f"category_id {category!r:.40} is not an integer or a string"
    crowd = ann.get("iscrowd", 0)
    if not (_is_number(crowd) and crowd in (0, 1)):
        return f"iscrowd {crowd!r:.40} is not 0 or 1"
    if "segmentation" in ann and not isinstance(ann["segmentation"], (list, dict, type(None))):
        return f"segmentation {ann['segmentation']!r:.40} is not polygons or RLE"
    if "bbox" in ann:
        box = ann["bbox"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
            return f"bbox {box!r:.40} is not [x, y, width, height]"
    return None


def sort_entries(coco: dict):
    """(images by id, category names by id, usable annotations, counts) of a file that
    `load_coco` accepted. Counted `bad_coco_entry`: an image without a usable id, a category
    without a usable id or a text name, a `categories` that is not a list (counted once; no
    labels then), an annotation `annotation_problem` names. Counted `corrupt_record`, as
    before: an annotation that is not an object or has no `id` / `image_id`."""
    counts = Counter()
    images = {}
    for im in coco["images"]:
        if isinstance(im, dict) and is_id(im.get("id")):
            images[im["id"]] = im
        else:
            counts[BAD] += 1
    names = {}
    categories = coco.get("categories")
    if categories is not None and not isinstance(categories, list):
        counts[BAD] += 1
        categories = []
    for c in categories or []:
        if isinstance(c, dict) and is_id(c.get("id")) and isinstance(c.get("name"), str):
            names[c["id"]] = c["name"]
        else:
            counts[BAD] += 1
    anns = []
    for a in coco["annotations"]:
        if not (isinstance(a, dict) and {"image_id", "id"} <= set(a)):
            counts["corrupt_record"] += 1  # nothing to key it on
        elif annotation_problem(a):
            counts[BAD] += 1
        else:
            anns.append(a)
    return images, names, anns, counts
