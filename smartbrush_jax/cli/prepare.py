"""`smartbrush-prepare` / `python -m smartbrush_jax.cli.prepare`: raw data sets -> a prepared
folder of ArrayRecord shards that is also a TFDS dataset (the library:
`smartbrush_jax.data.prepare`, which says how a run is split, resumed and assembled).

    python -m smartbrush_jax.cli.prepare --out /data/prepared \\
        --coco-annotations instances_train2017.json --coco-images train2017/ \\
        --openimages-csv train-annotations-object-segmentation.csv \\
        --openimages-masks masks/ --openimages-images train/ \\
        --openimages-classes oidv6-class-descriptions.csv \\
        --webdataset 'laion/*.tar' \\
        [--captions blip_captions.jsonl | --blip-model /models/blip-large --blip-device cuda]

Work runs on every core (`--workers`, default all of them); BLIP, when asked for, runs in
one process per GPU fed by the workers. The folder is built as `OUT.partial`: a run that
stops (killed, preempted, out of disk) is resumed by the same command, which redoes only
the work units that had not finished; other inputs or options are refused (`--restart`
discards the interrupted run). Every input is checked before any work (exit 2 with
`error: ...`). `--out` must be new (or, with `--overwrite`, a prepared folder). A source
that fails mid-way (a truncated shard, a file that vanished) is counted, what it gave
before is kept, and the run goes on.
"""

from __future__ import annotations

import argparse
import glob
import os

from smartbrush_jax.data.prepare import default_workers, is_prepared, prepare
from smartbrush_jax.data.sources import (
    CocoSource,
    OpenImagesSource,
    WebdatasetSource,
    check_openimages,
    load_coco,
    read_captions,
)
from smartbrush_jax.data.validate import Counter
from smartbrush_jax.errors import InputError, run_command


def build_parser():
    p = argparse.ArgumentParser(prog="smartbrush-prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write (new, or a prepared folder with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is a prepared folder")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's OUT.partial instead of "
                                                          "resuming it")
    p.add_argument("--coco-annotations")
    p.add_argument("--coco-images")
    p.add_argument("--openimages-csv")
    p.add_argument("--openimages-masks")
    p.add_argument("--openimages-images")
    p.add_argument("--openimages-classes")
    p.add_argument("--webdataset", nargs="*", default=[], help="tar files or glob patterns")
    p.add_argument("--captions", help="JSONL {annotation_id, caption} for the object crops")
    p.add_argument("--blip-model", help="caption objects without a caption with this local BLIP folder")
    p.add_argument("--blip-device", default="cpu", help="cpu, cuda (one captioning process per GPU) or cuda:N")
    p.add_argument("--blip-dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--blip-batch", type=int, default=16, help="crops per BLIP call (64-256 on a GPU)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: every core)")
    p.add_argument("--unit-images", type=int, default=64, help="COCO/OpenImages images per work unit (a "
                                                               "webdataset tar is one unit)")
    p.add_argument("--min-mask-area", type=float, default=0.01, help="fraction of the image; smaller masks skipped")
    p.add_argument("--max-pixels", type=int, default=8192 * 8192, help="larger images are skipped")
    p.add_argument("--shard-size", type=int, default=5000, help="most records per shard")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    from smartbrush_jax.outputs import building, check_output, partial_path

    sources, counts, captioning, inputs, fingerprint = _sources(args)  # every input checked before any work
    check_output(args.out, inputs, is_prepared, args.overwrite, what="prepared folder")
    if args.restart and os.path.isdir(partial_path(args.out)):
        print(f"--restart: discarding the interrupted run in {partial_path(args.out)}")
    workers = args.workers or default_workers()
    with building(args.out, keep_on_failure=True, resume=not args.restart) as tmp:
        meta = prepare(tmp, sources, counts=counts, shard_size=args.shard_size, workers=workers,
                       captioning=captioning, progress=not args.quiet, fingerprint=fingerprint,
                       extra_meta={"min_mask_area": args.min_mask_area, "max_pixels": args.max_pixels})
    for k, c in meta["components"].items():
        print(f"{k}: {c['count']} examples in {len(c['files'])} shard(s) {c['sources']}")
    for name, s in meta["skipped"].items():
        if s:
            print(f"skipped ({name}): {s}")
    print(os.path.join(args.out, "metadata.json"))
    return 0


def _sources(args):
    """(sources, counts, captioning, input paths, fingerprint), every input checked first:
    InputError."""
    if min(args.shard_size, args.blip_batch, args.max_pixels, args.unit_images) < 1:
        raise InputError("--shard-size, --blip-batch, --unit-images and --max-pixels must be >= 1")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.min_mask_area < 1.0:
        raise InputError(f"--min-mask-area is a fraction of the image in [0, 1), got {args.min_mask_area}")
    sources, counts, inputs = {}, {}, [args.captions]
    caption_counts = Counter()
    captions = read_captions(args.captions, caption_counts)
    fingerprint = {"captions": _identity(args.captions), "min_mask_area": args.min_mask_area,
                   "max_pixels": args.max_pixels, "unit_images": args.unit_images}
    if caption_counts:
        counts["captions"] = caption_counts  # lines of the side-file that were skipped
    if args.coco_annotations or args.coco_images:
        _need(args, "coco_annotations", "coco_images")
        sources["coco"] = CocoSource(load_coco(args.coco_annotations), args.coco_images, args.min_mask_area,
                                     captions, args.max_pixels, images_per_unit=args.unit_images)
        inputs += [args.coco_annotations, args.coco_images]
        fingerprint["coco"] = [_identity(args.coco_annotations), _identity(args.coco_images)]
    oi = ("openimages_csv", "openimages_masks", "openimages_images", "openimages_classes")
    if any(getattr(args, k) for k in oi):
        _need(args, *oi)
        check_openimages(args.openimages_csv, args.openimages_classes)
        inputs += [getattr(args, k) for k in oi]
        sources["openimages"] = OpenImagesSource(args.openimages_csv, args.openimages_masks, args.openimages_images,
                                                 args.openimages_classes, args.min_mask_area, captions,
                                                 args.max_pixels, images_per_unit=args.unit_images)
        fingerprint["openimages"] = [_identity(getattr(args, k)) for k in oi]
    if args.webdataset:
        tars = sorted(p for pat in args.webdataset for p in (glob.glob(pat) or [pat]))
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise InputError(f"--webdataset: no such file(s): {missing[:3]}")
        sources["webdataset"] = WebdatasetSource(tars, args.max_pixels)
        inputs += tars
        fingerprint["webdataset"] = [_identity(t) for t in tars]
    if not sources:
        raise InputError("nothing to prepare: give --coco-*, --openimages-* and/or --webdataset")
    captioning = None
    if args.blip_model:
        from smartbrush_jax.data.captioning import CaptionSpec

        if not os.path.isfile(os.path.join(args.blip_model, "config.json")):
            raise InputError(f"--blip-model {args.blip_model}: no such model folder (it needs config.json)")
        captioning = CaptionSpec(os.path.abspath(args.blip_model), args.blip_device, args.blip_batch, args.blip_dtype)
        captioning.devices()  # a device that is not there: before any work
        inputs.append(args.blip_model)
        fingerprint["blip_model"] = _identity(os.path.join(args.blip_model, "config.json"))
    return sources, counts, captioning, inputs, fingerprint


def _identity(path):
    """What decides whether an input changed: its absolute path, and for a file its size
    and modification time (a folder of images is taken as it is: listing millions of files
    would cost more than the check is worth)."""
    if not path:
        return None
    st = os.stat(path)
    if os.path.isdir(path):
        return [os.path.abspath(path)]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _need(args, *names):
    for n in names:
        value = getattr(args, n)
        if not value:
            raise InputError(f"--{n.replace('_', '-')} is required with the other {n.split('_')[0]} options")
        if not os.path.exists(value):
            raise InputError(f"--{n.replace('_', '-')} {value}: no such file or folder")


if __name__ == "__main__":
    raise SystemExit(main())
