"""The Grain input pipeline: prepared ArrayRecord components, mixed, decoded, batched.

Per component (`seg`: object masks, `t2i`: image-text): source -> shard by process ->
seeded shuffle (a new order every epoch) -> repeat -> decode/crop/resize/tokenize
(`random_map`, deterministic per element) -> iterator; components are mixed with
`IterDataset.mix` over a dict (weights from the config, so the mixture can change after a
checkpoint), prefetched by worker processes, bad records dropped and counted, batched.

A batch (per host) is a dict of numpy arrays:
    image        [B, R, R, 3] uint8      the crop, resized to the training resolution R
    mask         [B, R, R] uint8         the instance mask (all ones for image-text)
    latent_mask  [B, R/f, R/f] float32   the mask's area fraction per latent cell
    tokens       [B, 77] int32           CLIP token ids of the label or caption
    micro        [B, 6] int32            SDXL's micro-conditioning of the crop: source (h, w), crop
                                         top-left (y, x) in the resized frame, (R, R) (models/conditioning.py)
    is_t2i       [B] bool                image-text example (full mask)
    source       [B] str                 "coco", "openimages", "laion", "shapes", ...
    id           [B] str                 the record's id ("coco:123")
    skips        [B, len(SKIP_REASONS)]  records dropped (by reason) since the previous example

Latent caches (`python -m smartbrush_jax.cli.latents`: K fixed crops per record, their
VAE moments precomputed) give instead of `image`:
    latent_mean    [B, R/f, R/f, C] float32  the VAE encoder's mean of the stored crop
    latent_logvar  [B, R/f, R/f, C] float32  and its log-variance (z is sampled at train time)
There is no random crop then (augmentation is the K crops fixed in the cache, as in
MosaicML's SD recipe); the caption/label choice and tokenization still happen here.
The iterator's state (`get_state`/`set_state`, or Orbax via `grain.checkpoint`) restores
exactly the same next batches.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Dict, Optional, Sequence

import grain
import numpy as np
from PIL import Image

from smartbrush_jax.box import Box
from smartbrush_jax.data.records import RecordError, decode_mask, field, unpack_record
from smartbrush_jax.data.validate import SKIP_REASONS, Skip, check_caption, check_mask, decode_image
from smartbrush_jax.errors import InputError
from smartbrush_jax.models.conditioning import MICRO, crop_micro
from smartbrush_jax.models.tokenizer import load_tokenizer
from smartbrush_jax.settings import DataConfig

_TOKENIZER_LOCK = threading.Lock()
MISSING_MICRO = [-1] * MICRO  # a latent cache from before the crop's micro-conditioning was stored


class DataError(InputError):
    """Data that cannot be trained on (too many bad records, a folder that is not a
    prepared set, caches that do not match): the message names the folder or examples."""


def component_files(prepared_dirs: Sequence[str]) -> Dict[str, list]:
    """{"seg": [paths], "t2i": [paths]} from the metadata of prepared folders."""
    files = {"seg": [], "t2i": []}
    for d in prepared_dirs:
        meta = _read_meta(d)
        for name, comp in meta["components"].items():
            files.setdefault(name, []).extend(os.path.join(d, p) for p in comp["files"])
    return files


def _read_meta(d: str) -> dict:
    meta_path = os.path.join(d, "metadata.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"{d}: no metadata.json: not a prepared folder (run `python -m smartbrush_jax.cli.prepare` "
                        "first)")
    with open(meta_path) as f:
        return json.load(f)


def latent_cache(prepared_dirs: Sequence[str]) -> Optional[dict]:
    """The "latents" metadata entry when the folders are latent caches (`latents.py`),
    None when they are plain prepared folders; DataError when they are a mix, or caches
    of different resolutions, latent factors or VAEs."""
    entries = {d: _read_meta(d).get("latents") for d in prepared_dirs}
    cached = [d for d, e in entries.items() if e]
    if not cached:
        return None
    if len(cached) != len(entries):
        plain = [d for d, e in entries.items() if not e]
        raise DataError(f"data.prepared_dirs mixes latent caches {cached} with prepared folders {plain}: cache all "
                        "of them (`python -m smartbrush_jax.cli.latents`) or none")
    keys = ("resolution", "latent_factor", "channels", "vae", "scaling_factor")
    first = entries[cached[0]]
    for d in cached[1:]:
        diff = {k: (first.get(k), entries[d].get(k)) for k in keys if first.get(k) != entries[d].get(k)}
        if diff:
            raise DataError(f"latent caches {cached[0]} and {d} differ: {diff}")
    return first


def uncached_dirs(prepared_dirs: Sequence[str]) -> list:
    """The prepared folders (with images) that latent caches were made from; plain
    prepared folders are returned as they are (held-out samples need images)."""
    out = []
    for d in prepared_dirs:
        entry = _read_meta(d).get("latents") if os.path.isfile(os.path.join(d, "metadata.json")) else None
        out.append(entry["prepared"] if entry else d)
    return out


def make_dataset(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The batched, mixed, per-host IterDataset for one process of `process_count`.

    Latent caches (folders written by `python -m smartbrush_jax.cli.latents`) give
    `latent_mean`/`latent_logvar` instead of `image` (see the module docstring)."""
    cache = latent_cache(cfg.prepared_dirs)
    if cache is not None and (cache["resolution"], cache["latent_factor"]) != (cfg.resolution, cfg.latent_factor):
        raise DataError(f"the latent cache {cfg.prepared_dirs[0]} holds {cache['resolution']} px crops with latent "
                        f"factor {cache['latent_factor']}, but the config trains at {cfg.resolution} px with factor "
                        f"{cfg.latent_factor}: rebuild it with --resolution {cfg.resolution} (and the run's VAE)")
    files = component_files(cfg.prepared_dirs)
    transform = ExampleTransform(cfg)
    parts, weights = {}, {}
    for i, (name, weight) in enumerate(sorted(cfg.weights.items())):
        if weight <= 0:
            continue
        if not files.get(name):
            raise DataError(f"component {name!r} has weight {weight} but no records in {cfg.prepared_dirs}")
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files[name]))
        if len(ds) < process_count:
            raise DataError(f"component {name!r} has {len(ds)} records for {process_count} processes")
        ds = ds[process_index::process_count]
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + 7919 * i)
        ds = ds.repeat()
        ds = ds.random_map(transform, seed=cfg.seed + 104729 * (i + 1) + process_index)
        parts[name] = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                           prefetch_buffer_size=cfg.prefetch))
        weights[name] = weight
    mixed = grain.IterDataset.mix(parts, weights)
    if cfg.num_workers > 0:
        from smartbrush_jax.preemption import ignore_sigterm  # the main process saves, then ends the workers

        mixed = mixed.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                               per_worker_buffer_size=cfg.worker_buffer),
                                  worker_init_fn=ignore_sigterm)
    counted = CountSkips(mixed, cfg.max_bad_fraction, cfg.min_examples_for_check)
    return counted.batch(cfg.batch_size, drop_remainder=True)


class ExampleTransform:
    """record bytes + rng -> example dict, or {"skip": reason, "id": ...} for a bad record."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._local = threading.local()

    def __getstate__(self):  # worker processes load their own tokenizers
        return {"cfg": self.cfg}

    def __setstate__(self, state):
        self.__init__(state["cfg"])

    @property
    def tokenizer(self):
        """One tokenizer per thread: Grain decodes in a thread pool, and a fast tokenizer
        refuses concurrent calls ("Already borrowed")."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            with _TOKENIZER_LOCK:
                tok = self._local.tokenizer = load_tokenizer(self.cfg.tokenizer_dir)
        return tok

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict:
        rid = "?"
        try:
            rec = unpack_record(data)
            rid = str(rec.get("id", "?"))
            return self.example(rec, rng)
        except RecordError:  # written by another tool, or damaged: whatever does not parse or decode
            return {"skip": "corrupt_record", "id": rid}
        except Skip as e:
            return {"skip": e.reason, "id": rid}

    def example(self, rec: dict, rng: np.random.Generator) -> dict:
        if "latent_mean" in rec:
            return self.cached_example(rec, rng)
        ex = self.crop(rec, rng)
        del ex["box"]
        ex["tokens"] = self.tokens(ex.pop("text"))
        return ex

    def crop(self, rec: dict, rng: np.random.Generator) -> dict:
        """A prepared record -> the random crop: {"image", "mask", "latent_mask", "text",
        "is_t2i", "source", "id", "box": (x0, y0, side)}; the text (caption or label) is not tokenized yet. The
        crop half of `example`, shared with the latent cache (`latents.py`)."""
        cfg = self.cfg
        image = decode_image(field(rec, "image"), cfg.max_pixels)
        h, w = image.shape[:2]
        is_t2i = rec.get("kind") == "t2i"
        if is_t2i:
            mask = np.ones((h, w), bool)
            box = Box(0, 0, w, h)
        else:
            mask = check_mask(decode_mask(field(rec, "mask")), (h, w), cfg.min_mask_area)
            box = Box.of_mask(mask)
        text = self.choose_text(rec, rng)
        x0, y0, side = object_crop(box, w, h, rng, cfg.crop_context, full=is_t2i)
        r = cfg.resolution
        crop = Image.fromarray(image).crop((x0, y0, x0 + side, y0 + side)).resize((r, r), Image.Resampling.BICUBIC)
        mcrop = Image.fromarray(mask).crop((x0, y0, x0 + side, y0 + side)).resize((r, r), Image.Resampling.NEAREST)
        mask_r = np.asarray(mcrop, bool)
        return {"image": np.asarray(crop, np.uint8), "mask": mask_r.astype(np.uint8),
                "latent_mask": self.latent_mask(mask_r), "text": text, "is_t2i": np.bool_(is_t2i),
                "micro": crop_micro(h, w, x0, y0, side, r),
                "source": np.str_(rec.get("source", "")), "id": np.str_(rec.get("id", "")),
                "box": (x0, y0, side)}

    def cached_example(self, rec: dict, rng: np.random.Generator) -> dict:
        """A record of a latent cache (`latents.py`): the stored crop's VAE moments and mask;
        only the text (caption or label) is drawn here. No random crop: augmentation is
        the K crops fixed when the cache was written."""
        r = self.cfg.resolution
        shape = field(rec, "latent_shape", list)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise RecordError(f"latent_shape {shape!r}")
        try:
            dtype = np.dtype(rec.get("latent_dtype", "float16"))
        except TypeError:
            raise RecordError(f"latent_dtype {rec.get('latent_dtype')!r}") from None
        moments = []
        for k in ("latent_mean", "latent_logvar"):
            data = field(rec, k)
            if len(data) != int(np.prod(shape)) * dtype.itemsize:
                raise RecordError(f"{k}: {len(data)} bytes for {shape} {dtype}")
            moments.append(np.frombuffer(data, dtype).reshape(shape).astype(np.float32))
        mask = decode_mask(field(rec, "mask"))
        if mask.shape != (r, r):
            raise RecordError(f"cached mask {mask.shape} at resolution {r}")
        is_t2i = rec.get("kind") == "t2i"
        # caches written before it was recorded lack it (train.loop.check_micro_recorded refuses them for SDXL)
        micro = rec.get("micro", MISSING_MICRO)
        if not (isinstance(micro, list) and len(micro) == MICRO and all(isinstance(v, int) for v in micro)):
            raise RecordError(f"micro {micro!r}")
        return {"latent_mean": moments[0], "latent_logvar": moments[1], "mask": mask.astype(np.uint8),
                "micro": np.asarray(micro, np.int32),
                "latent_mask": self.latent_mask(mask), "tokens": self.tokens(self.choose_text(rec, rng)),
                "is_t2i": np.bool_(is_t2i), "source": np.str_(rec.get("source", "")),
                "id": np.str_(rec.get("id", ""))}

    def choose_text(self, rec: dict, rng: np.random.Generator) -> str:
        """Image-text: the caption; objects: the caption with probability `caption_mix`
        (when there is one), else the class label."""
        if rec.get("kind") == "t2i":
            return check_caption(rec.get("caption", ""))
        caption = check_caption(rec.get("caption", ""))
        label = check_caption(rec.get("label", ""))
        return caption if caption and (not label or rng.random() < self.cfg.caption_mix) else label

    def latent_mask(self, mask_r: np.ndarray) -> np.ndarray:
        """Bool [R, R] -> the mask's area fraction per latent cell [R/f, R/f] float32."""
        r, f = self.cfg.resolution, self.cfg.latent_factor
        return mask_r.reshape(r // f, f, r // f, f).mean(axis=(1, 3)).astype(np.float32)

    def tokens(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, padding="max_length", max_length=self.cfg.max_tokens, truncation=True).input_ids
        return np.asarray(ids, np.int32)


def object_crop(box, w: int, h: int, rng: np.random.Generator, context=(1.2, 3.0), full: bool = False):
    """A square crop (x0, y0, side) that holds the object's box where it fits: side is the
    object's longer side times U(context), at most the image's shorter side; the offset is
    random among positions that keep the box inside. `full`: the largest square, random."""
    short = min(w, h)
    bx0, by0, bx1, by1 = box
    if full:
        side = short
    else:
        obj = max(bx1 - bx0, by1 - by0)
        side = int(min(short, max(1, round(obj * rng.uniform(*context)))))
    def offset(lo_box, hi_box, extent):
        lo = max(0, hi_box - side)  # the box's far edge stays inside
        hi = min(lo_box, extent - side)  # the box's near edge stays inside
        if lo > hi:  # the object is larger than the crop: centre on it
            centre = (lo_box + hi_box) / 2
            return int(np.clip(round(centre - side / 2), 0, extent - side))
        return int(rng.integers(lo, hi + 1))
    return offset(bx0, bx1, w), offset(by0, by1, h), side


class CountSkips(grain.IterDataset):
    """Drops `{"skip": reason}` elements, adding their counts to the next good example's
    `skips` vector; raises DataError when more than `max_bad_fraction` of at least
    `min_examples` elements were bad."""

    def __init__(self, parent, max_bad_fraction: float, min_examples: int):
        super().__init__(parent)
        self.max_bad_fraction = max_bad_fraction
        self.min_examples = min_examples

    def __iter__(self):
        return _CountSkipsIterator(self._parent.__iter__(), self.max_bad_fraction, self.min_examples)


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent, max_bad_fraction, min_examples):
        super().__init__(parent)
        self.max_bad_fraction, self.min_examples = max_bad_fraction, min_examples
        self.pending = np.zeros(len(SKIP_REASONS), np.int32)
        self.seen = 0
        self.bad = 0
        self.bad_ids = []

    def __next__(self):
        while True:
            ex = next(self._parent)
            self.seen += 1
            if "skip" in ex:
                self.bad += 1
                self.pending[SKIP_REASONS.index(ex["skip"])] += 1
                if len(self.bad_ids) < 5:
                    self.bad_ids.append(f"{ex['id']} ({ex['skip']})")
                if self.seen >= self.min_examples and self.bad > self.max_bad_fraction * self.seen:
                    raise DataError(f"{self.bad} of {self.seen} records are bad (more than "
                                    f"{self.max_bad_fraction:.0%}); e.g. {', '.join(self.bad_ids)}")
                continue
            ex["skips"] = self.pending
            self.pending = np.zeros(len(SKIP_REASONS), np.int32)
            return ex

    def get_state(self):
        return {"parent": self._parent.get_state(), "pending": self.pending.tolist(), "seen": self.seen,
                "bad": self.bad, "bad_ids": list(self.bad_ids)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.pending = np.asarray(state["pending"], np.int32)
        self.seen, self.bad, self.bad_ids = state["seen"], state["bad"], list(state["bad_ids"])


def skip_totals(batch) -> Dict[str, int]:
    """{reason: count} of the records dropped while this batch was assembled."""
    totals = np.asarray(batch["skips"]).sum(axis=0)
    return {r: int(c) for r, c in zip(SKIP_REASONS, totals)}


