"""`smartbrush-prepare` / `python -m smartbrush_jax.data.prepare`: raw data sets -> ArrayRecord
shards + metadata (the library: `smartbrush_jax.data.prepare`).

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
import os

from smartbrush_jax.data.prepare import is_prepared, prepare
from smartbrush_jax.data.sources import (
    check_openimages,
    load_coco,
    read_captions,
    read_coco,
    read_openimages,
    read_webdataset,
)
from smartbrush_jax.data.validate import Counter
from smartbrush_jax.errors import InputError, run_command


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


