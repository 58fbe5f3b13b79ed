"""`python -m smartbrush_jax.cli.synthetic --out data/shapes --num-scenes 2000 --size 64`:
the bundled synthetic shapes set (`smartbrush_jax.data.synthetic`, whose docstring says what
it holds), in COCO + webdataset format."""

from __future__ import annotations

import argparse
import os

from smartbrush_jax.data.synthetic import __doc__ as SYNTHETIC_DOC
from smartbrush_jax.data.synthetic import is_synthetic_set, write_dataset
from smartbrush_jax.errors import InputError, run_command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=SYNTHETIC_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-scenes", type=int, default=2000)
    ap.add_argument("--num-text-pairs", type=int, default=None, help="image-text pairs (default: scenes / 4)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out that is a synthetic set")
    args = ap.parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    from smartbrush_jax.outputs import building, check_output

    if args.num_scenes < 1 or args.size < 16:
        raise InputError("--num-scenes must be >= 1 and --size >= 16")
    check_output(args.out, [], is_synthetic_set, args.overwrite, what="synthetic set")
    with building(args.out) as tmp:
        paths = write_dataset(tmp, args.num_scenes, args.size, args.seed, args.num_text_pairs, progress=True)
    for p in paths.values():
        print(os.path.join(args.out, os.path.relpath(p, tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
