"""Input pipeline throughput at 512 px: our Grain pipeline against a
`torch.utils.data.DataLoader` doing the same record decode / object crop / resize / mask /
tokenize work (the same `ExampleTransform`) with the same number of workers. Ours runs
twice: with W decode threads in the training process (PIL releases the GIL while
decoding and resizing) and with W grain worker processes.

    python bench/data_pipeline.py                 # 2 workers, batch 8, 512 px
    python bench/data_pipeline.py --workers 4 --json out.json

Builds a synthetic set at 640 px in a temporary folder, prepares it into ArrayRecord,
then times both loaders and prints examples/s, the ratio, and a one-line profile of where
one example's time goes (single process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build(root: str, scenes: int, size: int):
    from sd_fixtures import write_tokenizer

    from smartbrush_jax.cli.prepare import main as prepare
    from smartbrush_jax.data.synthetic import write_dataset

    raw = write_dataset(os.path.join(root, "raw"), scenes, size, seed=0)
    out = os.path.join(root, "prepared")
    prepare(["--out", out, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
             "--captions", raw["captions"], "--webdataset", raw["image_text"]])
    tok = os.path.join(root, "tok")
    write_tokenizer(tok)
    return out, tok


def bench_grain(cfg, batches, warmup):
    from smartbrush_jax.data.pipeline import make_dataset

    it = iter(make_dataset(cfg))
    rate = examples_per_second(it, batches, warmup, cfg.batch_size)
    it.close()
    return rate


def examples_per_second(it, batches: int, warmup: int, batch_size: int) -> float:
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


class TorchRecords:
    """A map-style torch dataset over the same records and the same transform."""

    def __init__(self, cfg):
        from smartbrush_jax.data.pipeline import ExampleTransform, component_files

        files = component_files(cfg.prepared_dirs)
        self.seg = files["seg"]
        self.t2i = files["t2i"]
        self.transform = ExampleTransform(cfg)
        self.sources = None

    def _open(self):
        import grain

        if self.sources is None:  # per worker
            self.sources = (grain.sources.ArrayRecordDataSource(self.seg),
                            grain.sources.ArrayRecordDataSource(self.t2i))
        return self.sources

    def __len__(self):
        return 10 ** 9

    def __getitem__(self, i):
        import numpy as np

        seg, t2i = self._open()
        rng = np.random.default_rng(i)
        src = t2i if i % 5 == 4 else seg  # the same 80/20 mixture
        ex = self.transform(src[(i * 7919) % len(src)], rng)
        return {k: v for k, v in ex.items() if k not in ("source", "id")}



def bench_torch(cfg, batches, warmup):
    import torch

    # spawn: forked workers segfault once the parent has run array_record/JAX threads
    loader = torch.utils.data.DataLoader(TorchRecords(cfg), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         shuffle=False, persistent_workers=cfg.num_workers > 0,
                                         multiprocessing_context="spawn" if cfg.num_workers > 0 else None)
    return examples_per_second(iter(loader), batches, warmup, cfg.batch_size)


def profile(cfg, n=40):
    """Seconds per example in each stage, one process."""
    import grain
    from PIL import Image

    from smartbrush_jax.data.pipeline import ExampleTransform, component_files, object_crop
    from smartbrush_jax.data.records import decode_mask, unpack_record
    from smartbrush_jax.data.validate import decode_image

    src = grain.sources.ArrayRecordDataSource(component_files(cfg.prepared_dirs)["seg"])
    tr = ExampleTransform(cfg)
    stages = dict(read=0.0, decode_image=0.0, decode_mask=0.0, crop_resize=0.0, tokenize=0.0)
    rng = np.random.default_rng(0)
    for i in range(n):
        t = time.perf_counter()
        rec = unpack_record(src[i % len(src)])
        t1 = time.perf_counter()
        img = decode_image(rec["image"])
        t2 = time.perf_counter()
        m = decode_mask(rec["mask"])
        t3 = time.perf_counter()
        ys, xs = np.nonzero(m)
        x0, y0, side = object_crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), img.shape[1], img.shape[0], rng)
        r = cfg.resolution
        Image.fromarray(img).crop((x0, y0, x0 + side, y0 + side)).resize((r, r), Image.Resampling.BICUBIC)
        Image.fromarray(m).crop((x0, y0, x0 + side, y0 + side)).resize((r, r), Image.Resampling.NEAREST)
        t4 = time.perf_counter()
        tr.tokenizer(rec["caption"], padding="max_length", max_length=77, truncation=True)
        t5 = time.perf_counter()
        for k, v in zip(stages, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[k] += v / n
    return stages


def main(argv=None):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--source-size", type=int, default=640)
    ap.add_argument("--scenes", type=int, default=120)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from smartbrush_jax.settings import DataConfig

    with tempfile.TemporaryDirectory() as root:
        print(f"[bench] building {args.scenes} scenes at {args.source_size}px ...", flush=True)
        prepared, tok = build(root, args.scenes, args.source_size)
        base = dict(prepared_dirs=[prepared], tokenizer_dir=tok, resolution=args.resolution, latent_factor=8,
                    batch_size=args.batch)
        cfg = DataConfig(**base, num_workers=args.workers)
        print("[bench] torch DataLoader ...", flush=True)
        torch_eps = bench_torch(cfg, args.batches, 5)
        print("[bench] grain (ours), worker processes ...", flush=True)
        procs_eps = bench_grain(DataConfig(**base, num_workers=args.workers, read_threads=1), args.batches, 5)
        print("[bench] grain (ours), decode threads ...", flush=True)
        ours_eps = bench_grain(DataConfig(**base, num_workers=0, read_threads=args.workers), args.batches, 5)
        stages = profile(cfg)
    total = sum(stages.values())
    line = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
    import grain
    import torch

    result = dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(), cpus=os.cpu_count(),
                  workers=args.workers, batch=args.batch, resolution=args.resolution, source_size=args.source_size,
                  ours_examples_per_s=ours_eps, ours_worker_processes_examples_per_s=procs_eps,
                  torch_examples_per_s=torch_eps, ratio=ours_eps / torch_eps,
                  profile_seconds_per_example=stages, grain=getattr(grain, "__version__", "?"),
                  torch=torch.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    w = args.workers
    print(f"\n{'':36s}{'examples/s':>12s}")
    print(f"{f'ours: grain, {w} decode threads':36s}{ours_eps:>12.1f}")
    print(f"{f'ours: grain, {w} worker processes':36s}{procs_eps:>12.1f}")
    print(f"{f'torch DataLoader, {w} workers':36s}{torch_eps:>12.1f}")
    print(f"ratio ours (threads) / torch: {ours_eps / torch_eps:.2f}")
    print(f"profile ({total * 1000:.1f} ms/example, 1 process): {line}")
    return result


if __name__ == "__main__":
    main()
