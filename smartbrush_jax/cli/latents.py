"""`smartbrush-latents` / `python -m smartbrush_jax.cli.latents`: a prepared folder -> a
latent cache (the library, with what a cache holds: `smartbrush_jax.data.latents`)."""

from __future__ import annotations

import argparse
import math
import os

from smartbrush_jax.data.latents import __doc__ as LATENTS_DOC
from smartbrush_jax.data.latents import cache_latents
from smartbrush_jax.errors import run_command


def build_parser():
    p = argparse.ArgumentParser(prog="smartbrush-latents", description=LATENTS_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True, help="a folder written by `python -m smartbrush_jax.cli.prepare`")
    p.add_argument("--out", required=True, help="the cache folder to write (new, or a cache to replace with "
                                              "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is a latent cache")
    p.add_argument("--vae", required=True, help="a diffusers SD folder with vae/ (the VAE the run trains with)")
    p.add_argument("--resolution", type=int, required=True, help="crop size in pixels (config.data.resolution)")
    p.add_argument("--crops", type=int, default=1, help="crops per record (K records each)")
    p.add_argument("--batch", type=int, default=16, help="crops per VAE call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-context", type=float, nargs=2, default=(1.2, 3.0), metavar=("LO", "HI"),
                   help="crop side / object size, sampled uniformly (config's data crop_context)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the VAE's compute dtype")
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--progress-every", type=int, default=1000, help="records between progress lines")
    g = p.add_argument_group("several hosts (every host runs the same command; one output)")
    g.add_argument("--distributed", action="store_true", help="let JAX find the cluster (Cloud TPU, SLURM, ...)")
    g.add_argument("--coordinator-address", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> int:
    from smartbrush_jax.distributed import Distributed
    from smartbrush_jax.errors import InputError

    lo, hi = args.crop_context
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise InputError(f"--crop-context LO HI needs 0 < LO <= HI, both finite, got {lo} {hi}")
    named = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in named) and not all(v is not None for v in named):
        raise InputError("--coordinator-address, --num-processes and --process-id go together")
    distributed = Distributed(auto=args.distributed, coordinator_address=args.coordinator_address,
                              num_processes=args.num_processes, process_id=args.process_id)
    meta = cache_latents(args.prepared, args.out, args.vae, args.resolution, distributed=distributed,
                         crops=args.crops, batch=args.batch, seed=args.seed, crop_context=tuple(args.crop_context),
                         dtype=args.dtype, shard_size=args.shard_size, progress_every=args.progress_every,
                         overwrite=args.overwrite)
    import jax

    return _report(meta, args.out) if jax.process_index() == 0 else 0


def _report(meta: dict, out: str) -> int:
    for k, c in meta["components"].items():
        print(f"{k}: {c['count']} crops in {len(c['files'])} shard(s) from {meta['source_records'][k]} records")
    for k, s in meta["skipped"].items():
        if s:
            print(f"skipped ({k}): {s}")
    print(os.path.join(out, "metadata.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
