"""`python -m smartbrush_jax.cli.latents`: a prepared folder -> a latent cache.

    python -m smartbrush_jax.cli.latents --prepared /data/prepared --out /data/latents512 \\
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
has the layout of a prepared folder (`metadata.json` naming the seg and t2i shards) plus a
`latents` entry in the metadata, and is a TFDS dataset too (`tfds_info.py`); point
`config.data.prepared_dirs` at it and train at the same resolution with the same VAE (the
entry records the VAE's family, scaling_factor and shift_factor, and the trainer refuses a
run whose VAE differs: `check_cache_vae`). The
trade-off: augmentation is fixed to the K crops, and the cache takes about
2 * (R/f)^2 * C * 2 bytes per crop (64 KiB at 512 px, SD's VAE).

On a slice or cluster every host runs the same command with `--distributed` (or the
coordinator flags): the output shards are fixed before any work (`shard_size // crops`
input records each), process i encodes shards i, i+N, ... on its own devices, and process 0
writes the metadata when all are done, so the cache is the same for any number of hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from smartbrush_jax.data.prepare import FORMAT_VERSION as PREPARED_FORMAT_VERSION
from smartbrush_jax.data.records import RecordError, encode_mask, pack_record, unpack_record
from smartbrush_jax.data.validate import SKIP_REASONS, Counter, Skip
from smartbrush_jax.errors import InputError

FORMAT_VERSION = 2  # records.py version 2 (TFDS features); caches of version 1 are still read
_COMPONENT_IDS = {"seg": 0, "t2i": 1}


def crop_rng(seed: int, component: str, index: int, crop: int) -> np.random.Generator:
    """The generator of crop `crop` of record `index` of `component`."""
    cid = _COMPONENT_IDS.get(component, zlib.crc32(component.encode()))
    return np.random.default_rng([seed, cid, index, crop])


def is_latent_cache(folder: str) -> bool:
    """A folder this command wrote: its metadata.json has a `latents` entry."""
    from smartbrush_jax import storage

    try:
        return bool(json.loads(storage.read_text(storage.join(folder, "metadata.json"))).get("latents"))
    except (InputError, OSError, ValueError, AttributeError):
        return False


def _check(spec: "CacheSpec"):
    meta_path = os.path.join(spec.prepared, "metadata.json")
    if not os.path.isdir(spec.prepared):
        raise InputError(f"--prepared {spec.prepared}: no such folder")
    if not os.path.isfile(meta_path):
        raise InputError(f"--prepared {spec.prepared}: no metadata.json (run `python -m smartbrush_jax.cli.prepare`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        meta["components"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"--prepared {spec.prepared}: unreadable metadata.json ({type(e).__name__}: {e})") from None
    if meta.get("latents"):
        raise InputError(f"--prepared {spec.prepared} is already a latent cache; give the prepared folder it came from")
    if not os.path.isfile(os.path.join(spec.vae, "vae", "config.json")):
        raise InputError(f"--vae {spec.vae}: no vae/config.json (expected a diffusers Stable Diffusion folder)")
    if spec.crops < 1 or spec.batch < 1 or spec.resolution < 1 or spec.shard_size < 1:
        raise InputError("--crops, --batch, --resolution and --shard-size must be positive")
    from smartbrush_jax.outputs import check_output

    check_output(spec.out, [spec.prepared, spec.vae], is_latent_cache, spec.overwrite, what="latent cache")
    return meta


def folder_family(folder: str, vae_config) -> Optional[str]:
    """The family (`interop/families.py`) of the SD folder whose VAE encodes a cache: what
    its U-Net config and model_index.json say; a folder with only vae/ is named by its
    latent scale where one family owns it (SDXL), else None (SD v1 and 2.x share a VAE)."""
    from smartbrush_jax.interop.families import VAE_SCALING, family_of
    from smartbrush_jax.models.unet_config import UNetConfig

    try:
        with open(os.path.join(folder, "unet", "config.json")) as f:
            unet = UNetConfig.from_diffusers(json.load(f))
        index = {}
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            with open(os.path.join(folder, "model_index.json")) as f:
                index = json.load(f)
        return family_of(unet, index if isinstance(index, dict) else {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        owners = [f for f, v in VAE_SCALING.items() if abs(v - vae_config.scaling_factor) <= 1e-6]
        return owners[0] if len(owners) == 1 else None


def _owner(family: Optional[str], scaling: Optional[float]) -> str:
    """A VAE's name: its recorded family, else the families whose VAE has its latent scale."""
    from smartbrush_jax.interop.families import VAE_SCALING

    owners = [f for f, v in VAE_SCALING.items() if scaling is not None and abs(v - scaling) <= 1e-6]
    return family or "/".join(owners) or "an unknown"


def check_cache_vae(dirs: Sequence[str], family: Optional[str], scaling_factor: float, shift_factor=None,
                    channels: Optional[int] = None, vae: str = "<the run's model.init_from>") -> None:
    """A training run's VAE against the one each latent cache of `dirs` was encoded with
    (plain prepared folders need nothing): DataError naming both when the latent scale,
    shift or width differ (an SDXL run on a cache of SD v1's VAE would train on latents its
    U-Net never saw). A cache written before the family was recorded is checked by the
    scaling_factor caches always recorded, with one warning that the rest cannot be."""
    from smartbrush_jax.data.pipeline import DataError, latent_cache
    from smartbrush_jax.errors import warn

    run = f"{_owner(family, scaling_factor)} ({scaling_factor})"
    rebuild = f"rebuild the cache with `python -m smartbrush_jax.cli.latents --vae {vae}`"
    for d in dirs:
        entry = latent_cache([d])
        if not entry:
            continue
        scale, shift, width = entry.get("scaling_factor"), entry.get("shift_factor"), entry.get("channels")
        if scale is None:
            warn(f"the latent cache {d} does not record the VAE that encoded it (written by an older version): it "
                 f"cannot be checked against this run's VAE, {run}; {rebuild} to be sure")
            continue
        made = f"the latent cache {d} was encoded by the {_owner(entry.get('family'), scale)} VAE"
        if abs(float(scale) - scaling_factor) > 1e-6 or (shift or None) != (shift_factor or None):
            shifts = f", shift_factor {shift}" if shift or shift_factor else ""
            theirs = f"{scaling_factor}{f', shift_factor {shift_factor}' if shifts else ''}"
            raise DataError(f"{made} (scaling_factor {scale}{shifts}), this run's VAE is "
                            f"{_owner(family, scaling_factor)} ({theirs}): {rebuild}, or train with the VAE it was "
                            "encoded with")
        if channels is not None and width is not None and width != channels:
            raise DataError(f"{made} ({width}-channel latents), this run's VAE makes {channels}-channel latents: "
                            f"{rebuild}")
        if "family" not in entry:
            warn(f"the latent cache {d} was written before caches recorded their VAE's family: only its "
                 f"scaling_factor {scale} (the same as this run's VAE, {run}) could be checked, not which VAE it "
                 f"was; {rebuild} to record it")


def check_run_vae(dirs: Sequence[str], models, vae: str) -> None:
    """`check_cache_vae` for the trainer's models (`train/step.py: Models`); a pixel-space
    run has no VAE to check (the pipeline refuses its latent factor)."""
    config = getattr(models.autoencoder, "config", None)
    if config is None or not dirs:
        return
    from smartbrush_jax.interop.families import family_of

    check_cache_vae(dirs, family_of(models.unet.config) if models.pretrained is not None else None,
                    config.scaling_factor, getattr(config, "shift_factor", None), config.latent_channels, vae)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What `cache_latents` writes (the command's flags, `smartbrush-latents --help`)."""

    prepared: str  # a prepared folder
    out: str  # the cache folder to write
    vae: str  # a diffusers SD folder with vae/
    resolution: int  # crop size in pixels (config.data.resolution)
    crops: int = 1  # crops per record
    batch: int = 16  # crops per VAE call
    seed: int = 0
    crop_context: Tuple[float, float] = (1.2, 3.0)  # crop side / object size, sampled uniformly
    dtype: str = "float32"  # the VAE's compute dtype
    shard_size: int = 5000
    progress_every: int = 1000  # records between progress lines
    overwrite: bool = False  # replace an existing `out` that is a latent cache


def cache_latents(prepared: str, out: str, vae: str, resolution: int, *, distributed=None, **options) -> dict:
    """Write the cache of `prepared` to `out` (`CacheSpec` says what each option means);
    every process of a multi-process job (`distributed`, a
    `smartbrush_jax.distributed.Distributed`) calls this with the same arguments and encodes
    its share of the shards on its own devices; process 0 writes the metadata once all are
    done. Returns the metadata."""
    import jax

    from smartbrush_jax.distributed import Distributed

    spec = CacheSpec(prepared, out, vae, resolution, **options)
    (distributed or Distributed()).initialize()
    src_meta = _check(spec)
    encoder = _Encoder(spec, src_meta)
    blocks = _plan(spec, src_meta)
    nproc, me = jax.process_count(), jax.process_index()
    mine = [i for i in range(len(blocks)) if i % nproc == me]
    start = time.time()
    if nproc == 1:
        from smartbrush_jax.outputs import building

        with building(spec.out) as out_dir:  # swapped in when complete
            _write_blocks(out_dir, blocks, mine, encoder, spec, start)
            meta = _assemble(out_dir, blocks, _summaries(out_dir), encoder, spec, src_meta)
    else:
        meta = _distributed(spec, blocks, mine, encoder, src_meta, me, start)
    print(f"  latents: {len(mine)} of {len(blocks)} shards in {time.time() - start:.0f}s (process {me} of {nproc})",
          file=sys.stderr)
    return meta


class _Encoder:
    """The VAE encoder, jitted over this process's own devices (the batch split between them)."""

    def __init__(self, spec, src_meta):
        import json

        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from smartbrush_jax.data.pipeline import ExampleTransform
        from smartbrush_jax.interop.loader import load_diffusers_folder
        from smartbrush_jax.interop.weights import WeightsError
        from smartbrush_jax.models import AutoencoderKL
        from smartbrush_jax.settings import DataConfig

        try:
            with open(os.path.join(spec.vae, "vae", "config.json")) as f:
                n_blocks = len(json.load(f)["block_out_channels"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"--vae {spec.vae}: unreadable vae/config.json ({e})") from None
        self.factor = 2 ** (n_blocks - 1)
        if spec.resolution % self.factor:
            raise InputError(f"--resolution {spec.resolution} is not a multiple of the VAE's factor {self.factor}")
        try:
            sd = load_diffusers_folder(spec.vae, components=("vae",))
        except WeightsError as e:
            raise InputError(f"--vae {spec.vae}: {e}") from None
        self.config = sd.vae_config
        self.family = folder_family(spec.vae, sd.vae_config)
        self.channels = sd.vae_config.latent_channels
        vae = AutoencoderKL(sd.vae_config, dtype=jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32)
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch = -(-spec.batch // len(devices)) * len(devices)  # a multiple of the local devices
        self.rows = rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(sd.vae_params, NamedSharding(self.mesh, PartitionSpec()))
        self.encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode), out_shardings=rows)
        cfg = DataConfig(resolution=spec.resolution, latent_factor=self.factor, crop_context=tuple(spec.crop_context),
                         max_pixels=int(src_meta.get("max_pixels", DataConfig.max_pixels)))
        self.transform = ExampleTransform(cfg)

    def __call__(self, images: List[np.ndarray]):
        import jax

        r = images[0].shape[0]
        pixels = np.zeros((self.batch, r, r, 3), np.float32)
        for j, image in enumerate(images):
            pixels[j] = image.astype(np.float32) / 127.5 - 1.0
        mean, logvar = jax.device_get(self.encode(self.params, jax.device_put(pixels, self.rows)))
        return mean[:len(images)], logvar[:len(images)]


def _plan(spec, src_meta) -> List[tuple]:
    """The output shards, fixed before any work: (component, files, first record, end) --
    `shard_size // crops` input records each, seg then t2i -- so every process knows every
    shard's final name, and the cache is the same for any number of processes."""
    import grain

    from smartbrush_jax.data import tfds_info

    per = max(1, spec.shard_size // spec.crops)
    blocks = []
    for name in tfds_info.split_order(src_meta["components"]):
        files = [os.path.join(spec.prepared, p) for p in src_meta["components"][name]["files"]]
        n = len(grain.sources.ArrayRecordDataSource(files)) if files else 0
        blocks += [(name, files, a, min(n, a + per)) for a in range(0, n, per)]
    return blocks


def _write_blocks(out_dir, blocks, mine, encoder, spec, start) -> None:
    import grain

    from smartbrush_jax.data import tfds_info
    from smartbrush_jax.data.shards import ShardWriter

    os.makedirs(os.path.join(out_dir, "blocks"), exist_ok=True)
    h = spec.resolution // encoder.factor
    sources, done = {}, 0
    for i in mine:
        name, files, a, b = blocks[i]
        key = tuple(files)
        if key not in sources:
            sources[key] = grain.sources.ArrayRecordDataSource(files)
        src = sources[key]
        writer = ShardWriter(out_dir, lambda _, i=i: tfds_info.shard_name("cached", i, len(blocks)), 1 << 62)
        counts, per_source, pending = Counter(), Counter(), []

        def flush():
            if pending:
                mean, logvar = encoder([image for _, image in pending])
                for j, (fields, _) in enumerate(pending):
                    fields["latent_mean"] = np.asarray(mean[j], np.float16).tobytes()
                    fields["latent_logvar"] = np.asarray(logvar[j], np.float16).tobytes()
                    writer.write(pack_record(fields))
                pending.clear()

        for index in range(a, b):
            try:
                crops = _record_crops(encoder.transform, src[index], spec, name, index, [h, h, encoder.channels])
            except Skip as e:
                counts[e.reason] += 1
                continue
            for fields, image in crops:
                per_source[fields["source"]] += 1
                pending.append((fields, image))
                if len(pending) == encoder.batch:
                    flush()
            done += 1
            if spec.progress_every and done % spec.progress_every == 0:
                print(f"  latents: {done} records ({done / (time.time() - start):.1f}/s)", file=sys.stderr)
        flush()
        ((file, count),) = writer.close(allow_empty=True)
        summary = {"block": i, "component": name, "file": file, "count": count, "records": b - a,
                   "sources": dict(per_source), "counts": dict(counts),
                   "bytes": os.path.getsize(os.path.join(out_dir, file))}
        tmp = os.path.join(out_dir, "blocks", f"{i:06d}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, tmp[:-4])


def _summaries(folder) -> dict:
    from smartbrush_jax import storage

    out = {}
    for p in storage.P(storage.join(folder, "blocks")).glob("*.json"):
        s = json.loads(p.read_text())
        out[s["block"]] = s
    return out


def _assemble(out_dir, blocks, summaries, encoder, spec, src_meta) -> dict:
    """metadata.json + the TFDS info of the whole cache, from every shard's summary."""
    import shutil

    from smartbrush_jax.data import tfds_info

    missing = [i for i in range(len(blocks)) if i not in summaries]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of the cache were not written (a process failed?)")
    components, skipped, source_records = {}, {}, {}
    for i in range(len(blocks)):
        s = summaries[i]
        comp = components.setdefault(s["component"], {"count": 0, "files": [], "shard_lengths": [], "sources": {}})
        comp["count"] += s["count"]
        comp["files"].append(s["file"])
        comp["shard_lengths"].append(s["count"])
        for k, v in s["sources"].items():
            comp["sources"][k] = comp["sources"].get(k, 0) + v
        sk = skipped.setdefault(s["component"], {})
        for k, v in s["counts"].items():
            sk[k] = sk.get(k, 0) + v
        source_records[s["component"]] = source_records.get(s["component"], 0) + s["records"]
    h = spec.resolution // encoder.factor
    files = [summaries[i]["file"] for i in range(len(blocks))]
    if files:
        tfds_info.write_info(out_dir, "cached", [os.path.join(out_dir, f) for f in files],
                             [summaries[i]["count"] for i in range(len(blocks))],
                             sum(summaries[i]["bytes"] for i in range(len(blocks))))
    meta = {
        "format_version": PREPARED_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "components": components,
        "classes": src_meta.get("classes", []),
        "skipped": {k: {r: v[r] for r in SKIP_REASONS if v.get(r)} for k, v in skipped.items()},
        "source_records": source_records,
        "tfds": {"name": tfds_info.DATASET_NAME["cached"], "split": tfds_info.SPLIT},
        "latents": {"resolution": spec.resolution, "latent_factor": encoder.factor, "channels": encoder.channels,
                    "crops": spec.crops, "vae": os.path.abspath(spec.vae),
                    "scaling_factor": encoder.config.scaling_factor, "format_version": FORMAT_VERSION,
                    "family": encoder.family,  # the VAE that encoded it: a run of another VAE is refused
                    "shift_factor": getattr(encoder.config, "shift_factor", None),
                    "dtype": "float16", "latent_shape": [h, h, encoder.channels], "seed": spec.seed,
                    "crop_context": list(spec.crop_context), "vae_dtype": spec.dtype,
                    "prepared": os.path.abspath(spec.prepared),
                    "micro": True},  # each crop's SDXL micro-conditioning is in its record
    }
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(os.path.join(out_dir, "blocks"), ignore_errors=True)
    return meta


def _distributed(spec, blocks, mine, encoder, src_meta, me, start) -> dict:
    """Several processes, one output: a folder every process sees (a shared file system) is
    built as OUT.partial by all and swapped in by process 0; a gs:// OUT gets each process's
    shards uploaded, then process 0's metadata (last, so a reader never sees half a cache)."""
    import shutil
    import tempfile

    from smartbrush_jax import storage
    from smartbrush_jax.distributed import barrier
    from smartbrush_jax.outputs import PARTIAL_MARKER, partial_path, swap_in

    if storage.is_remote(spec.out):
        if me == 0 and storage.exists(spec.out):
            storage.P(spec.out).rmtree()  # an earlier cache that check_output allowed to be replaced
        barrier("latents: out ready")
        with tempfile.TemporaryDirectory(prefix="smartbrush_latents_") as tmp:
            _write_blocks(tmp, blocks, mine, encoder, spec, start)
            storage.upload(tmp, spec.out)
        barrier("latents: shards written")
        meta = None
        if me == 0:
            with tempfile.TemporaryDirectory(prefix="smartbrush_latents_") as tmp:
                meta = _assemble(tmp, blocks, _summaries(spec.out), encoder, spec, src_meta)
                storage.upload(tmp, spec.out)
            storage.P(storage.join(spec.out, "blocks")).rmtree()
        barrier("latents: metadata written")
        return meta or json.loads(storage.read_text(storage.join(spec.out, "metadata.json")))
    partial = partial_path(spec.out)
    if me == 0:
        if os.path.lexists(partial):
            shutil.rmtree(partial)  # ours (check_output verified the marker)
        os.makedirs(partial)
        open(os.path.join(partial, PARTIAL_MARKER), "w").close()
    barrier("latents: out ready")
    if not os.path.isfile(os.path.join(partial, PARTIAL_MARKER)):
        raise InputError(f"--out {spec.out}: process {me} does not see {partial}, which process 0 created; with "
                         "several hosts --out must be on a file system they share (NFS, a gcsfuse mount) or gs://")
    _write_blocks(partial, blocks, mine, encoder, spec, start)
    barrier("latents: shards written")
    if me == 0:
        meta = _assemble(partial, blocks, _summaries(partial), encoder, spec, src_meta)
        os.remove(os.path.join(partial, PARTIAL_MARKER))
        swap_in(partial, spec.out)
    barrier("latents: metadata written")
    with open(os.path.join(spec.out, "metadata.json")) as f:
        return json.load(f)


def _record_crops(transform, data: bytes, spec, component: str, index: int, shape) -> list:
    """The K (fields, image crop) of one prepared record; Skip if it is bad."""
    from smartbrush_jax.data.validate import check_caption

    try:
        rec = unpack_record(data)
        text = {k: check_caption(rec.get(k, "")) for k in ("label", "caption")}
        crops = [transform.crop(rec, crop_rng(spec.seed, component, index, k)) for k in range(spec.crops)]
    except RecordError as e:  # whatever does not parse or decode, as the training pipeline counts it
        raise Skip("corrupt_record", str(e)) from None
    out = []
    for k, c in enumerate(crops):
        fields = {"id": str(rec.get("id", "")), "source": str(rec.get("source", "")),
                  "kind": str(rec.get("kind", component)), **text, "crop": k,
                  "box": [int(v) for v in c["box"]], "mask": encode_mask(c["mask"] > 0),
                  "micro": [int(v) for v in c["micro"]],
                  "latent_shape": list(shape), "latent_dtype": "float16"}
        out.append((fields, c["image"]))
    return out
