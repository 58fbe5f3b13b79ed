"""`python -m smartbrush_jax.cli.aot --config=configs/tpu_v4.py --topology=v4-32` (or
`smartbrush-aot`): the train step compiled ahead of time for a TPU slice on this host, and
what it needs (the library: `smartbrush_jax.train.aot`).

    --topology v4-32 | v5p-128 | v5litepod-256 | v6e-256 | 2xv5p-128 (slices x name)
    --target h100 | h200  an 8-GPU node instead (`planning/gpus.py`: needs the jax CUDA
                          plugin, `make .venv-gpu-aot`; exit 2 with the reason without it)
    --cached-latents      the step reads a latent cache (no VAE encode in the step)
    --cached-text         the step reads text states, not tokens (no text encoder in the
                          step, as MLPerf's SD runs pre-encode text; SD v1/2.x)
    --per-chip-batch B    the global batch becomes B x chips
    --find-max-batch      the largest per-chip batch that fits, by compiling
    --json FILE           the report as JSON (with jax/libtpu versions and the date)
    --config.x=...        any config field, as for training

Exit codes: 0 the step fits (or the search ended), 1 it does not fit, 2 bad input (an
unknown topology, no libtpu or CUDA plugin, a config that does not load or validate).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the TPU is the target, not a backend here

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=False)
flags.DEFINE_string("topology", None, "TPU slice: v4-32, v5p-128, v5litepod-256, v6e-256, 2xv5p-128, ...")
flags.DEFINE_string("target", None, "GPU node instead of a TPU slice: h100 or h200 (8 GPUs; h100x16: two nodes)")
flags.DEFINE_bool("cached_latents", False, "compile the step of a run on a latent cache (no VAE in the step)")
flags.DEFINE_bool("cached_text", False, "compile the step of a run on cached text states (no text encoder in the "
                  "step, as MLPerf's SD runs)")
flags.DEFINE_integer("per_chip_batch", None, "images per chip (the global batch is this x chips)")
flags.DEFINE_bool("find_max_batch", False, "search the largest per-chip batch that fits")
flags.DEFINE_integer("max_compiles", 5, "compiles the search may spend")
flags.DEFINE_string("json", None, "write the report here")


def versions() -> dict:
    import importlib.metadata as md

    out = {"date": time.strftime("%Y-%m-%d %H:%M")}
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "nvidia-cudnn-cu12", "flax"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv) -> None:
    del argv
    from smartbrush_jax import libtpu_flags as tpu_flags
    from smartbrush_jax.config import ConfigError, validate
    from smartbrush_jax.errors import InputError
    from smartbrush_jax.planning import gpus, targets
    from smartbrush_jax.train import aot

    try:
        if bool(FLAGS.topology) == bool(FLAGS.target):
            raise InputError("give one of --topology (a TPU slice) or --target (a GPU node: h100, h200)")
        target = gpus.parse(FLAGS.target) if FLAGS.target else targets.parse(FLAGS.topology)
        config = FLAGS.config
        validate(config, data=False)  # the flags below are the config's: checked before libtpu reads them
        tpu_flags.apply(config.train.libtpu_flags)
        devices = target.devices()
        if FLAGS.per_chip_batch:
            config.train.batch_size = FLAGS.per_chip_batch * len(devices)
        validate(config, len(devices), target.hosts, data=False)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"compiling the SmartBrush train step for {target.name} ({target.topology_name}, {len(devices)} devices) "
          "on this host; the full SD step takes minutes", file=sys.stderr)
    out = {**versions(), "config": os.path.basename(_config_path()), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if FLAGS.find_max_batch:
        partial = (lambda s: _write_json({**out, **s}, FLAGS.json)) if FLAGS.json else None
        search = aot.find_max_batch(config, target, FLAGS.cached_latents, max_compiles=FLAGS.max_compiles,
                                    devices=devices, cached_text=FLAGS.cached_text,
                                    log=lambda s: print(s, file=sys.stderr), on_compile=partial)
        out.update(search)
        best = search["report"]
        note = "exact" if search["exact"] else f"search stopped after {search['compiles']} compiles"
        print(f"largest per-chip batch that fits: {search['max_per_chip_batch']} (compiled; {note}; first "
              f"failure {search['first_failure']}); memory linear in the batch predicts "
              f"{search['predicted_max_per_chip_batch']}")
        if best:
            print("\n".join(aot.summary_lines(best)))
        code = 0
    else:
        r = aot.report(config, target, FLAGS.cached_latents, devices, FLAGS.cached_text)
        out.update(r)
        print("\n".join(aot.summary_lines(r)))
        code = 0 if r["fits"] else 1
    if FLAGS.json:
        _write_json(out, FLAGS.json)
        print(FLAGS.json)
    sys.exit(code)


def _write_json(out: dict, path: str) -> None:
    """Beside the target, then swapped in: a kill mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(tmp, path)


def _config_path() -> str:
    for a in sys.argv[1:]:
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return ""


def _underscored(arg: str) -> str:
    """`--find-max-batch` as `--find_max_batch` (both spellings work; config overrides, which
    hold dots, are left alone)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return arg if "." in name else "--" + name.replace("-", "_") + eq + value


def console():
    from smartbrush_jax.cli.absl_config import check_config_file, parse_flags

    sys.argv = [sys.argv[0]] + [_underscored(a) for a in sys.argv[1:]]
    check_config_file(sys.argv)
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
