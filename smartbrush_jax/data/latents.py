"""`python -m smartbrush_jax.data.latents`: a prepared folder -> a latent cache.

    python -m smartbrush_jax.data.latents --prepared /data/prepared --out /data/latents512 \\
        --vae /models/stable-diffusion-v1-2 --resolution 512 [--crops 4] [--batch 32] [--seed 0]

The frozen VAE encoder costs about half a U-Net training step at 512 px (1.11 of 2.41
TFLOP per image); a cache runs it once per crop instead of once per step (MosaicML's SD
recipe). For each record of the prepared folder it takes K crops through the training
pipeline's own crop code (`ExampleTransform.crop`, with a generator seeded by (seed,
component, record, crop), so the crops are reproducible), encodes them with our JAX
AutoencoderKL (jitted, `--batch` crops at a time) and writes one record per crop:

    latent_mean, latent_logvar   float16 bytes [R/f, R/f, C] (`latent_shape`, `latent_dtype`
                                 in the header); z = mean + exp(logvar / 2) * noise is drawn
                                 at train time, so the sampling noise stays fresh
    mask                         PNG of the crop's instance mask at R x R
    id, source, kind, label, caption   text stays text: tokenization and the caption/label
                                 choice happen at train time
    crop, box                    the crop's index k and (x0, y0, side) in the source image

Records that fail to decode are skipped and counted by reason, as in `prepare`. The output
has the layout of a prepared folder (`seg-*`/`t2i-*` shards, `metadata.json`) plus a
`latents` entry in the metadata; point `config.data.prepared_dirs` at it and train at the
same resolution with the same VAE. The trade-off: augmentation is fixed to the K crops,
and the cache takes about 2 * (R/f)^2 * C * 2 bytes per crop (64 KiB at 512 px, SD's VAE).
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from typing import List

import numpy as np

from smartbrush_jax.data.prepare import FORMAT_VERSION as PREPARED_FORMAT_VERSION
from smartbrush_jax.data.prepare import ShardWriter
from smartbrush_jax.data.records import RecordError, encode_mask, pack_record, unpack_record
from smartbrush_jax.data.validate import SKIP_REASONS, Counter, Skip
from smartbrush_jax.errors import InputError

FORMAT_VERSION = 1
_COMPONENT_IDS = {"seg": 0, "t2i": 1}


def crop_rng(seed: int, component: str, index: int, crop: int) -> np.random.Generator:
    """The generator of crop `crop` of record `index` of `component`."""
    cid = _COMPONENT_IDS.get(component, zlib.crc32(component.encode()))
    return np.random.default_rng([seed, cid, index, crop])


def is_latent_cache(folder: str) -> bool:
    """A folder this command wrote: its metadata.json has a `latents` entry."""
    import json

    from smartbrush_jax import storage

    try:
        return bool(json.loads(storage.read_text(storage.join(folder, "metadata.json"))).get("latents"))
    except (InputError, OSError, ValueError, AttributeError):
        return False


def _check_args(args):
    import json

    meta_path = os.path.join(args.prepared, "metadata.json")
    if not os.path.isdir(args.prepared):
        raise InputError(f"--prepared {args.prepared}: no such folder")
    if not os.path.isfile(meta_path):
        raise InputError(f"--prepared {args.prepared}: no metadata.json (run `python -m smartbrush_jax.data.prepare`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        meta["components"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"--prepared {args.prepared}: unreadable metadata.json ({type(e).__name__}: {e})") from None
    if meta.get("latents"):
        raise InputError(f"--prepared {args.prepared} is already a latent cache; give the prepared folder it came from")
    if not os.path.isfile(os.path.join(args.vae, "vae", "config.json")):
        raise InputError(f"--vae {args.vae}: no vae/config.json (expected a diffusers Stable Diffusion folder)")
    if args.crops < 1 or args.batch < 1 or args.resolution < 1 or args.shard_size < 1:
        raise InputError("--crops, --batch, --resolution and --shard-size must be positive")
    from smartbrush_jax.outputs import check_output

    check_output(args.out, [args.prepared, args.vae], is_latent_cache, args.overwrite, what="latent cache")
    return meta


def cache_latents(args) -> dict:
    import json

    import grain
    import jax
    import jax.numpy as jnp

    from smartbrush_jax.data.pipeline import ExampleTransform
    from smartbrush_jax.models import AutoencoderKL
    from smartbrush_jax.pretrained import load_diffusers_folder
    from smartbrush_jax.settings import DataConfig
    from smartbrush_jax.weights import WeightsError

    src_meta = _check_args(args)
    try:
        with open(os.path.join(args.vae, "vae", "config.json")) as f:
            n_blocks = len(json.load(f)["block_out_channels"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"--vae {args.vae}: unreadable vae/config.json ({e})") from None
    factor = 2 ** (n_blocks - 1)
    if args.resolution % factor:
        raise InputError(f"--resolution {args.resolution} is not a multiple of the VAE's factor {factor}")
    try:
        sd = load_diffusers_folder(args.vae, components=("vae",))
    except WeightsError as e:
        raise InputError(f"--vae {args.vae}: {e}") from None
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    vae = AutoencoderKL(sd.vae_config, dtype=dtype)
    channels = sd.vae_config.latent_channels
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    params = sd.vae_params

    cfg = DataConfig(resolution=args.resolution, latent_factor=factor, crop_context=tuple(args.crop_context),
                     max_pixels=int(src_meta.get("max_pixels", DataConfig.max_pixels)))
    transform = ExampleTransform(cfg)
    from smartbrush_jax.outputs import building

    with building(args.out) as out_dir:  # swapped in when complete
        r, B, h = args.resolution, args.batch, args.resolution // factor
        components, skipped, source_records = {}, {}, {}
        start, done = time.time(), 0
        for name, comp in src_meta["components"].items():
            writer = ShardWriter(out_dir, name, args.shard_size)
            counts, per_source = Counter(), Counter()
            pending: List[tuple] = []  # (fields, image crop)

            def flush():
                if not pending:
                    return
                pixels = np.zeros((B, r, r, 3), np.float32)
                for j, (_, image) in enumerate(pending):
                    pixels[j] = image.astype(np.float32) / 127.5 - 1.0
                mean, logvar = jax.device_get(encode(params, jnp.asarray(pixels)))
                for j, (fields, _) in enumerate(pending):
                    fields["latent_mean"] = np.asarray(mean[j], np.float16).tobytes()
                    fields["latent_logvar"] = np.asarray(logvar[j], np.float16).tobytes()
                    writer.write(pack_record(fields))
                pending.clear()

            files = [os.path.join(args.prepared, p) for p in comp["files"]]
            src = grain.sources.ArrayRecordDataSource(files) if files else []
            for i in range(len(src)):
                try:
                    crops = _record_crops(transform, src[i], args, name, i, [h, h, channels])
                except Skip as e:
                    counts[e.reason] += 1
                    continue
                for fields, image in crops:
                    per_source[fields["source"]] += 1
                    pending.append((fields, image))
                    if len(pending) == B:
                        flush()
                done += 1
                if args.progress_every and done % args.progress_every == 0:
                    print(f"  latents: {done} records ({done / (time.time() - start):.1f}/s) [{name}]", file=sys.stderr)
            flush()
            components[name] = {"count": writer.count, "files": writer.close(), "sources": dict(per_source)}
            skipped[name] = {k: counts[k] for k in SKIP_REASONS if counts.get(k)}
            source_records[name] = len(src)
        meta = {
            "format_version": PREPARED_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "components": components,
            "classes": src_meta.get("classes", []),
            "skipped": skipped,
            "source_records": source_records,
            "latents": {"resolution": r, "latent_factor": factor, "channels": channels, "crops": args.crops,
                        "vae": os.path.abspath(args.vae), "scaling_factor": sd.vae_config.scaling_factor,
                        "format_version": FORMAT_VERSION, "dtype": "float16", "latent_shape": [h, h, channels],
                        "seed": args.seed, "crop_context": list(args.crop_context), "vae_dtype": args.dtype,
                        "prepared": os.path.abspath(args.prepared)},
        }
        with open(os.path.join(out_dir, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2)
        print(f"  latents: {done} records in {time.time() - start:.0f}s", file=sys.stderr)
    return meta


def _record_crops(transform, data: bytes, args, component: str, index: int, shape) -> list:
    """The K (fields, image crop) of one prepared record; Skip if it is bad."""
    from smartbrush_jax.data.validate import check_caption

    try:
        rec = unpack_record(data)
        text = {k: check_caption(rec.get(k, "")) for k in ("label", "caption")}
        crops = [transform.crop(rec, crop_rng(args.seed, component, index, k)) for k in range(args.crops)]
    except RecordError as e:  # whatever does not parse or decode, as the training pipeline counts it
        raise Skip("corrupt_record", str(e)) from None
    out = []
    for k, c in enumerate(crops):
        fields = {"id": str(rec.get("id", "")), "source": str(rec.get("source", "")),
                  "kind": str(rec.get("kind", component)), **text, "crop": k,
                  "box": [int(v) for v in c["box"]], "mask": encode_mask(c["mask"] > 0),
                  "latent_shape": list(shape), "latent_dtype": "float16"}
        out.append((fields, c["image"]))
    return out


if __name__ == "__main__":
    from smartbrush_jax.cli.latents import main

    sys.exit(main())
