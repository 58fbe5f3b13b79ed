"""`python -m smartbrush_jax.data.prepare`: raw data sets -> ArrayRecord shards + metadata.

    python -m smartbrush_jax.data.prepare --out /data/prepared \\
        --coco-annotations instances_train2017.json --coco-images train2017/ \\
        --openimages-csv train-annotations-object-segmentation.csv \\
        --openimages-masks masks/ --openimages-images train/ \\
        --openimages-classes oidv6-class-descriptions.csv \\
        --webdataset laion/00000.tar laion/00001.tar \\
        [--captions blip_captions.jsonl | --blip-model /models/blip-large]

Writes `seg-NNNNN-of-MMMMM.array_record` (object-mask examples), `t2i-...` (image-text
examples) and `metadata.json` (counts per source, classes, skipped records by reason).
Every example is decoded and checked once here (`validate.py`), so training reads clean
records. Records are plain bytes + JSON (`records.py`), never pickles.

Every input is checked before any work (exit 2 with `error: ...`). `--out` must be new
(or, with `--overwrite`, a prepared folder); it is written as `OUT.partial` and renamed
when complete. A source that fails mid-way (a truncated shard, a file that vanished) is
counted, what it gave before is kept, and the run goes on.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Dict, Iterable, List

from smartbrush_jax.data.records import encode_mask, pack_record
from smartbrush_jax.data.sources import (
    RawExample,
    check_openimages,
    load_coco,
    read_captions,
    read_coco,
    read_openimages,
    read_webdataset,
)
from smartbrush_jax.data.validate import ALL_REASONS, Counter
from smartbrush_jax.errors import InputError, run_command

FORMAT_VERSION = 1


class ShardWriter:
    """Writes records into shards of `shard_size`, named `-of-` the total at close."""

    def __init__(self, out: str, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.paths: List[str] = []
        self.writer = None
        self.count = 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None or self.count % self.shard_size == 0:
            self._close_current()
            path = os.path.join(self.out, f".{self.prefix}-{len(self.paths):05d}.tmp")
            self.paths.append(path)
            self.writer = ArrayRecordWriter(path, "group_size:1")
        self.writer.write(record)
        self.count += 1

    def _close_current(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> List[str]:
        self._close_current()
        final = []
        for i, tmp in enumerate(self.paths):
            path = os.path.join(self.out, f"{self.prefix}-{i:05d}-of-{len(self.paths):05d}.array_record")
            os.replace(tmp, path)
            final.append(os.path.basename(path))
        return final


def to_record(ex: RawExample) -> bytes:
    fields = {"id": ex.id, "source": ex.source, "kind": ex.kind, "label": ex.label, "caption": ex.caption,
              "image": ex.image_bytes}
    if ex.mask is not None:
        fields["mask"] = encode_mask(ex.mask)
        fields["box"] = ex.box
    return pack_record(fields)


def prepare(out: str, readers: Dict[str, Iterable[RawExample]], counts: Dict[str, Counter], shard_size: int = 5000,
            captioner=None, progress: bool = True, extra_meta: dict = None) -> dict:
    """Drain `readers` (name -> iterator of RawExample) into shards; return the metadata."""
    os.makedirs(out, exist_ok=True)
    writers = {"seg": ShardWriter(out, "seg", shard_size), "t2i": ShardWriter(out, "t2i", shard_size)}
    per_source = {"seg": Counter(), "t2i": Counter()}
    classes = set()
    generated = []
    start, n = time.time(), 0
    for name, reader in readers.items():
        pending: List[RawExample] = []
        for ex in _guarded(reader, name, counts.setdefault(name, Counter())):
            if captioner is not None and ex.kind == "seg" and not ex.caption:
                pending.append(ex)
                if len(pending) >= captioner.batch_size:
                    n += _flush(pending, captioner, writers, per_source, classes, generated)
                continue
            _write(ex, writers, per_source, classes)
            n += 1
            if progress and n % 1000 == 0:
                print(f"  prepare: {n} examples ({n / (time.time() - start):.0f}/s) [{name}]", file=sys.stderr)
        if pending:
            n += _flush(pending, captioner, writers, per_source, classes, generated)
    meta = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "components": {k: {"count": w.count, "files": w.close(), "sources": dict(per_source[k])}
                       for k, w in writers.items()},
        "classes": sorted(classes),
        "skipped": {name: {r: c.get(r, 0) for r in ALL_REASONS if c.get(r, 0)} for name, c in counts.items()},
        "other_counts": {name: {r: v for r, v in c.items() if r not in ALL_REASONS} for name, c in counts.items()},
        **(extra_meta or {}),
    }
    if generated:
        with open(os.path.join(out, "blip_captions.jsonl"), "w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generated)
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if progress:
        print(f"  prepare: {n} examples in {time.time() - start:.0f}s", file=sys.stderr)
    return meta


def _guarded(reader, name: str, counts: Counter):
    """The reader's examples until it ends or fails: a failure mid-way (a shard cut short,
    a file gone, a reader's bug) is counted `unreadable_source` with a warning and its
    traceback; what it yielded before stays written, and the next source is read."""
    import traceback

    n = 0
    it = iter(reader)
    while True:
        try:
            ex = next(it)
        except StopIteration:
            return
        except InputError:
            raise
        except Exception as e:
            counts["unreadable_source"] += 1
            print(f"warning: {name}: reading stopped after {n} examples ({type(e).__name__}: {e}); they are kept, "
                  "the other sources are read", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return
        n += 1
        yield ex


def is_prepared(folder: str) -> bool:
    """A folder this command wrote: our metadata.json, not a latent cache's."""
    try:
        with open(os.path.join(folder, "metadata.json")) as f:
            meta = json.load(f)
        return "format_version" in meta and "components" in meta and not meta.get("latents")
    except (OSError, ValueError, TypeError):
        return False


def _write(ex, writers, per_source, classes):
    writers[ex.kind].write(to_record(ex))
    per_source[ex.kind][ex.source] += 1
    if ex.label:
        classes.add(ex.label)


def _flush(pending, captioner, writers, per_source, classes, generated) -> int:
    caps = captioner.caption([captioner.crop(ex.image, ex.box) for ex in pending])
    for ex, cap in zip(pending, caps):
        ex.caption = cap
        generated.append({"annotation_id": ex.id.split(":", 1)[1], "caption": cap})
        _write(ex, writers, per_source, classes)
    n = len(pending)
    pending.clear()
    return n


def build_parser():
    p = argparse.ArgumentParser(prog="smartbrush-prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write (new, or a prepared folder with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is a prepared folder")
    p.add_argument("--coco-annotations")
    p.add_argument("--coco-images")
    p.add_argument("--openimages-csv")
    p.add_argument("--openimages-masks")
    p.add_argument("--openimages-images")
    p.add_argument("--openimages-classes")
    p.add_argument("--webdataset", nargs="*", default=[], help="tar files or glob patterns")
    p.add_argument("--captions", help="JSONL {annotation_id, caption} for the object crops")
    p.add_argument("--blip-model", help="caption objects without a caption with this local BLIP folder")
    p.add_argument("--blip-batch", type=int, default=16)
    p.add_argument("--min-mask-area", type=float, default=0.01, help="fraction of the image; smaller masks skipped")
    p.add_argument("--max-pixels", type=int, default=8192 * 8192, help="larger images are skipped")
    p.add_argument("--shard-size", type=int, default=5000)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    from smartbrush_jax.outputs import building, check_output

    readers, counts, captioner, inputs = _readers(args)  # every input checked before any work
    check_output(args.out, inputs, is_prepared, args.overwrite, what="prepared folder")
    with building(args.out) as tmp:
        meta = prepare(tmp, readers, counts, args.shard_size, captioner,
                       extra_meta={"min_mask_area": args.min_mask_area, "max_pixels": args.max_pixels})
    for k, c in meta["components"].items():
        print(f"{k}: {c['count']} examples in {len(c['files'])} shard(s) {c['sources']}")
    for name, s in meta["skipped"].items():
        if s:
            print(f"skipped ({name}): {s}")
    print(os.path.join(args.out, "metadata.json"))
    return 0


def _readers(args):
    """(readers, counts, captioner, input paths), every input checked first: InputError."""
    if args.shard_size < 1 or args.blip_batch < 1 or args.max_pixels < 1:
        raise InputError("--shard-size, --blip-batch and --max-pixels must be >= 1")
    if not 0.0 <= args.min_mask_area < 1.0:
        raise InputError(f"--min-mask-area is a fraction of the image in [0, 1), got {args.min_mask_area}")
    readers, counts, inputs = {}, {}, [args.captions]
    caption_counts = Counter()
    captions = read_captions(args.captions, caption_counts)
    if caption_counts:
        counts["captions"] = caption_counts  # lines of the side-file that were skipped
    if args.coco_annotations or args.coco_images:
        _need(args, "coco_annotations", "coco_images")
        counts["coco"] = Counter()
        coco = load_coco(args.coco_annotations)
        readers["coco"] = read_coco(coco, args.coco_images, counts["coco"], args.min_mask_area, captions,
                                    args.max_pixels)
        inputs += [args.coco_annotations, args.coco_images]
    oi = ("openimages_csv", "openimages_masks", "openimages_images", "openimages_classes")
    if any(getattr(args, k) for k in oi):
        _need(args, *oi)
        check_openimages(args.openimages_csv, args.openimages_classes)
        inputs += [getattr(args, k) for k in oi]
        counts["openimages"] = Counter()
        readers["openimages"] = read_openimages(args.openimages_csv, args.openimages_masks, args.openimages_images,
                                                args.openimages_classes, counts["openimages"], args.min_mask_area,
                                                captions, args.max_pixels)
    if args.webdataset:
        tars = sorted(p for pat in args.webdataset for p in (glob.glob(pat) or [pat]))
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise InputError(f"--webdataset: no such file(s): {missing[:3]}")
        counts["webdataset"] = Counter()
        readers["webdataset"] = read_webdataset(tars, counts["webdataset"], args.max_pixels)
        inputs += tars
    if not readers:
        raise InputError("nothing to prepare: give --coco-*, --openimages-* and/or --webdataset")
    captioner = None
    if args.blip_model:
        from smartbrush_jax.data.blip import BlipCaptioner

        if not os.path.isdir(args.blip_model):
            raise InputError(f"--blip-model {args.blip_model}: no such folder")
        captioner = BlipCaptioner(args.blip_model, args.blip_batch)
        inputs.append(args.blip_model)
    return readers, counts, captioner, inputs


def _need(args, *names):
    for n in names:
        value = getattr(args, n)
        if not value:
            raise InputError(f"--{n.replace('_', '-')} is required with the other {n.split('_')[0]} options")
        if not os.path.exists(value):
            raise InputError(f"--{n.replace('_', '-')} {value}: no such file or folder")


if __name__ == "__main__":
    sys.exit(main())
