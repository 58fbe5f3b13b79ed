"""One work unit of `prepare` (some images of COCO or OpenImages, one webdataset tar): read,
validate, caption, encode, and write its shards under `OUT.partial/units/`.

A unit is finished when its summary `units/KEY.json` exists (written last, atomically,
after its shards were renamed into place); everything else in `units/` is redone. The
same function runs in the main process (`--workers 1`) and in the pool's workers, so a
parallel run writes exactly the records of a serial one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import traceback
from typing import Dict, Iterator, List, Optional

from PIL import Image

from smartbrush_jax.data.records import encode_mask, pack_record
from smartbrush_jax.data.shards import ShardWriter
from smartbrush_jax.data.sources import RawExample, encode_png
from smartbrush_jax.data.validate import Counter
from smartbrush_jax.errors import InputError

KINDS = ("seg", "t2i")


@dataclasses.dataclass
class Job:
    folder: str  # OUT.partial/units
    sources: Dict[str, object]  # name -> a source (units(), read(unit, counts))
    plan: List[tuple]  # [(source name, unit index, unit)]
    shard_size: int
    captioner: Optional[object] = None  # .caption(crops) -> captions (in-process or a CaptionClient)


_JOB: Optional[Job] = None  # set before the pool forks (shared copy-on-write) or for an in-process run


def set_job(job: Optional[Job]) -> None:
    global _JOB
    _JOB = job


def unit_key(name: str, index: int) -> str:
    return f"{name}-{index:06d}"


def summary_path(folder: str, key: str) -> str:
    return os.path.join(folder, key + ".json")


def read_summary(folder: str, key: str) -> Optional[dict]:
    """The summary of a finished unit, or None (not finished, or a file cut short)."""
    try:
        with open(summary_path(folder, key)) as f:
            summary = json.load(f)
        return summary if isinstance(summary, dict) and summary.get("key") == key else None
    except (OSError, ValueError):
        return None


def run_unit(i: int) -> dict:
    """Unit `i` of the plan, written; its summary (also saved as `units/KEY.json`)."""
    job = _JOB
    name, index, unit = job.plan[i]
    key = unit_key(name, index)
    counts = Counter()
    examples = _guarded(job.sources[name].read(unit, counts), key, counts)
    if job.captioner is not None:
        examples = iter(_captioned(list(examples), job.folder, key, job.captioner))
    writers = {k: ShardWriter(job.folder, lambda j, k=k: f"{key}.{k}-{j:04d}.array_record", job.shard_size)
               for k in KINDS}
    per_source = {k: Counter() for k in KINDS}
    classes = set()
    for ex in examples:
        writers[ex.kind].write(to_record(ex, counts))
        per_source[ex.kind][ex.source] += 1
        if ex.label:
            classes.add(ex.label)
    summary = {"key": key, "source": name, "index": index, "counts": dict(counts),
               "files": {k: w.close() for k, w in writers.items()},
               "sources": {k: dict(v) for k, v in per_source.items()}, "classes": sorted(classes),
               "examples": sum(w.count for w in writers.values())}
    _write_json(summary_path(job.folder, key), summary)
    return summary


def to_record(ex: RawExample, counts: Optional[Counter] = None) -> bytes:
    h, w = ex.image.shape[:2]
    fields = {"id": ex.id, "source": ex.source, "kind": ex.kind, "label": ex.label, "caption": ex.caption,
              "image": record_image(ex, counts)}
    if ex.mask is not None:
        fields["mask"] = encode_mask(ex.mask)
        fields["box"] = ex.box
    else:
        fields["box"] = [0, 0, w, h]
    return pack_record(fields)


def record_image(ex: RawExample, counts: Optional[Counter] = None) -> bytes:
    """The file's own bytes when any decoder gives the pixels we validated (an RGB JPEG, PNG
    or WEBP without an EXIF rotation); otherwise (CMYK, grey, 16 bit, alpha, palette,
    rotated) a PNG of those pixels, so a TFDS reader sees the same image as ours."""
    with Image.open(io.BytesIO(ex.image_bytes)) as im:
        plain = im.format in ("JPEG", "PNG", "WEBP") and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1
        plain = plain and "transparency" not in im.info
    if plain:
        return ex.image_bytes
    if counts is not None:
        counts["converted_png"] += 1
    return encode_png(ex.image)


def _guarded(examples: Iterator[RawExample], key: str, counts: Counter) -> Iterator[RawExample]:
    """The unit's examples until it ends or fails: a failure mid-way (a file gone, a reader's
    bug) is counted `unreadable_source` with a warning and its traceback; what it yielded
    before is kept."""
    n = 0
    while True:
        try:
            ex = next(examples)
        except StopIteration:
            return
        except InputError:
            raise
        except Exception as e:
            counts["unreadable_source"] += 1
            print(f"warning: work unit {key}: reading stopped after {n} examples ({type(e).__name__}: {e}); "
                  "they are kept", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return
        n += 1
        yield ex


def _captioned(examples: List[RawExample], folder: str, key: str, captioner) -> List[RawExample]:
    """BLIP captions for the seg examples without one; saved per unit (`KEY.blip.jsonl`) before
    the shards, so a rerun after a crash reuses them instead of running BLIP again."""
    from smartbrush_jax.data.blip import caption_crop

    path = os.path.join(folder, key + ".blip.jsonl")
    known = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                    known[row["id"]] = row["caption"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: captioned again
    wanted = [ex for ex in examples if ex.kind == "seg" and not ex.caption]
    todo = [ex for ex in wanted if ex.id not in known]
    if todo:
        for ex, cap in zip(todo, captioner.caption([caption_crop(ex.image, ex.box) for ex in todo])):
            known[ex.id] = cap
        rows = [{"id": ex.id, "annotation_id": ex.id.split(":", 1)[1], "caption": known[ex.id]} for ex in wanted]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
    for ex in wanted:
        ex.caption = known[ex.id]
    return examples


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
