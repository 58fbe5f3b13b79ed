"""`python -m smartbrush_jax.train --config=configs/tpu_v4.py --workdir=DIR`

Trains SmartBrush: a sharded, jitted, donated train step (encode, text dropout, degrade
the mask, U-Net, MSE + DICE, AdamW, EMA) over a Grain pipeline, with Orbax checkpoints
(state and data iterator together), automatic resume, SIGTERM-safe exits and clu metrics.
Any config field can be overridden: `--config.optim.lr=2e-5`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with the cluster's auto-detection")

# what the step reads from a batch: `image` from prepared folders, `latent_mean`/`latent_logvar` from latent caches
BATCH_KEYS = ("image", "latent_mean", "latent_logvar", "mask", "latent_mask", "tokens")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


def main(argv) -> None:
    del argv
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    from smartbrush_jax.errors import InputError

    try:
        run(FLAGS.config, FLAGS.workdir)
    except (TrainingError, InputError) as e:  # bad input: exit 2; a run that cannot go on: 1; bugs: traceback
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)


def run(config, workdir: str) -> dict:
    """Trains to `config.train.steps` and returns the summary, or stops at SIGTERM after
    saving (then the summary has `"stopped": True` and no summary.json is written, so a
    job script can tell); the SIGTERM handler is installed for this call only."""
    import contextlib

    from smartbrush_jax.preemption import StopRequest

    with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever happens
        stop = StopRequest().install()  # before any slow start-up work
        cleanup.callback(stop.uninstall)
        return _run(config, workdir, stop, cleanup)


def _run(config, workdir: str, stop, cleanup) -> dict:
    from smartbrush_jax import checkpoints, flops, sharding
    from smartbrush_jax.config import ConfigError, validate
    from smartbrush_jax.train_state import build_models, make_optimizer

    # ------------------------------------------------------------------ processes, config
    if FLAGS.num_processes and FLAGS.num_processes > 1:
        # cross-process collectives for CPU devices (ignored by GPU/TPU backends); set
        # before initialize(), which must come before any backend use
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    if stop.attach_to_jax():
        logging.info("SIGTERM is handled by JAX's preemption service (the stop step is agreed between processes)")
    pidx, pcount = jax.process_index(), jax.process_count()
    validate(config, jax.device_count(), pcount)
    os.makedirs(workdir, exist_ok=True)
    logging.info("process %d/%d, %d devices (%s)", pidx, pcount, jax.device_count(), jax.devices()[0].platform)

    # ------------------------------------------------------------------ data, tokenizer, models
    data_cfg, heldout_cfg, tokenizer = setup_data(config, workdir)
    models = build_models(config, len(tokenizer))
    empty_tokens = np.asarray(tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids,
                              np.int32)
    if data_cfg.resolution % models.latent_factor:
        raise ConfigError(f"config.data.resolution {data_cfg.resolution} is not a multiple of the autoencoder's "
                         f"factor {models.latent_factor}")
    mesh = sharding.make_mesh(dict(config.mesh.shape), dict(config.mesh.dcn_shape))
    rules = sharding.rules_from_config(config.mesh.fsdp)
    tx = make_optimizer(config)
    state, frozen, state_shardings, frozen_shardings = init_state(models, config, tx, mesh, rules)

    from smartbrush_jax.data.pipeline import make_dataset

    data_iter = iter(make_dataset(data_cfg, pidx, pcount))
    cleanup.callback(data_iter.close)  # ends Grain's worker processes and frees their shared memory
    mngr = checkpoints.manager(workdir, config.train.keep_last, config.train.keep_every)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      state, state_shardings)
    start, restored = checkpoints.restore_newest_intact(mngr, abstract, data_iter, _all_agree if pcount > 1 else bool,
                                                        is_primary=pidx == 0)
    if start is None:
        start = 0
    else:
        state = restored
        logging.info("resumed from step %d", start)
        print(f"resumed from step {start}", file=sys.stderr)
    if pidx == 0:
        checkpoints.write_run_files(
            workdir, {**models.model_config(), "num_levels": config.model.num_levels,
                      "init_from": os.path.abspath(config.model.init_from) if config.model.init_from else "",
                      "resolution": config.data.resolution, "degrade": {
                          k: config.loss[k] for k in ("sigma_scale", "truncate", "threshold")},
                      "sampler": {"num_steps": config.train.sample_steps,
                                  "guidance_scale": config.train.sample_guidance}},
            tokenizer.name_or_path, None if config.model.init_from else frozen)

    # ------------------------------------------------------------------ the step
    from smartbrush_jax.train_state import make_train_step

    step_fn = jax.jit(make_train_step(models, config, tx, empty_tokens),
                      in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    sampler = Samples(models, config, empty_tokens, heldout_cfg, workdir, mesh)
    latent = data_cfg.resolution // models.latent_factor
    model_flops = flops.train_step_flops(flops.unet_forward_flops(
        models.unet.config, config.train.batch_size, latent, latent, len(empty_tokens)))
    peak = config.train.peak_tflops * 1e12 or flops.peak_flops_per_device(jax.devices()[0])
    flop_report = {}

    # ------------------------------------------------------------------ metrics
    from clu import metric_writers, periodic_actions

    from smartbrush_jax.prefetch import DevicePrefetch

    writer = metric_writers.create_default_writer(workdir, just_logging=pidx > 0)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.train.steps, writer=writer,
                                             every_steps=config.train.log_every)]
    if config.train.profile_steps and pidx == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps, logdir=workdir,
                                              first_profile=start + 10))

    # ------------------------------------------------------------------ train loop
    history, skips = [], None
    check_every = max(1, min(config.train.log_every, config.train.max_nonfinite_in_a_row))
    step = start
    t0 = time.time()
    batches = DevicePrefetch(data_iter, lambda local: (local["skips"].sum(0), sharding.shard_batch(
        mesh, {k: local[k] for k in BATCH_KEYS if k in local})), config.data.prefetch_to_device)

    def finish_early(read_error=None) -> dict:
        """SIGTERM, or on one process a data pipeline that failed: save this step unless it
        is in a non-finite streak, say which checkpoint is the latest; then return (SIGTERM)
        or raise (DataError: too many bad records, exit 2; anything else: exit 1)."""
        streak = int(jax.device_get(state["nonfinite_streak"]))
        if streak == 0 and step > start:
            checkpoints.save(mngr, step, state, batches.consumed_state(), force=True)
        mngr.wait_until_finished()
        writer.flush()
        latest = mngr.latest_step()
        if streak:
            saved = f"step {step} not saved ({streak} non-finite steps in a row); latest checkpoint: {latest}"
        elif step > start:
            saved = f"checkpoint at step {step} saved"
        else:
            saved = f"no step taken since start-up; latest checkpoint: {latest}"
        if read_error is None or stop.signalled:
            if read_error is not None:
                logging.warning("after SIGTERM the data pipeline failed (%s); the checkpoint holds the batches "
                                "consumed before it", read_error)
            logging.info("SIGTERM: %s; exiting", saved)
            print(f"SIGTERM: {saved}; exiting", file=sys.stderr)
            return {"steps": step, "stopped": True, "latest_checkpoint": latest}
        if isinstance(read_error, DataError):
            raise DataError(f"{read_error} (at step {step}: {saved})") from read_error
        traceback.print_exception(read_error)
        raise TrainingError(f"data pipeline failed ({read_error}) at step {step}: {saved}") from read_error

    from smartbrush_jax.data.pipeline import DataError

    def read(take: bool):
        """The next batch (take) or a refill of the device queue; an exception from the
        data pipeline on one process ends the run through finish_early (several processes
        cannot save alone: the error propagates and the last periodic checkpoint resumes)."""
        try:
            return batches.next() if take else batches.fill()
        except Exception as e:
            if pcount > 1:
                raise
            return e

    if not stop.coordinated and stop.signalled:
        return finish_early()  # SIGTERM while loading, restoring or building data: nothing to save
    while step < config.train.steps:
        got = read(take=True)
        if isinstance(got, Exception):
            return finish_early(got)
        batch_skips, batch = got
        skips = batch_skips if skips is None else skips + batch_skips
        if step == start:  # compile here (the call below reuses it) for XLA's FLOP count
            flop_report = flops.step_report(step_fn.lower(state, frozen, batch).compile(), model_flops,
                                            jax.device_count(), peak)
            logging.info("%s", flops.format_report(flop_report))
            window = (time.time(), step)  # throughput is measured between log points
        state, metrics = step_fn(state, frozen, batch)
        step += 1
        stopping = stop.should_stop(step)  # on every process at every step (JAX's sync point needs it)
        if step < config.train.steps and not stopping:
            got = read(take=False)  # read and transfer the next batch while the device runs this step
            if isinstance(got, Exception):
                return finish_early(got)
        for h in hooks:
            h(step)
        if step % check_every == 0 or step % config.train.log_every == 0 or step == config.train.steps:
            m = jax.device_get(metrics)
            if int(m["nonfinite_streak"]) >= config.train.max_nonfinite_in_a_row:
                mngr.wait_until_finished()
                raise TrainingError(
                    f"{int(m['nonfinite_streak'])} non-finite steps in a row (loss or gradient) at step {step}; "
                    f"stopped. The last good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints")
            if step % config.train.log_every == 0 or step == config.train.steps:
                scalars = {k: float(v) for k, v in m.items()}
                scalars.update({f"data_skipped/{r}": float(c) for r, c in zip(_reasons(), skips)})
                speed = flops.throughput(model_flops, (time.time() - window[0]) / (step - window[1]),
                                         jax.device_count(), peak)
                window = (time.time(), step)
                scalars.update(speed)
                writer.write_scalars(step, scalars)
                history.append({"step": step, **{k: scalars[k] for k in ("loss", "mse", "dice", "iou")}, **speed})
        if stopping:
            return finish_early()
        if step % config.train.checkpoint_every == 0 or step == config.train.steps:
            streak = int(jax.device_get(state["nonfinite_streak"]))
            if streak == 0:
                checkpoints.save(mngr, step, state, batches.consumed_state(), force=True)
            else:
                logging.warning("step %d: checkpoint skipped (%d non-finite steps in a row); the latest is step %s",
                                step, streak, mngr.latest_step())
        if config.train.sample_every and (step % config.train.sample_every == 0 or step == config.train.steps):
            iou = sampler(state["ema"], frozen, step, writer)
            history.append({"step": step, "heldout_iou": iou})
            window = (time.time(), step)  # sampling is not training time
    mngr.wait_until_finished()
    writer.flush()
    summary = {"steps": step, "seconds": time.time() - t0, "history": history, "flops": flop_report,
               "nonfinite_total": int(jax.device_get(state["nonfinite_total"]))}
    name = "summary.json" if pidx == 0 else f"summary_process{pidx}.json"
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _all_agree(ok: bool) -> bool:
    """True when `ok` on every process (an all-gather: also a barrier)."""
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def _reasons():
    from smartbrush_jax.data.validate import SKIP_REASONS

    return SKIP_REASONS


def setup_data(config, workdir: str):
    """DataConfigs for training and held-out samples, and the tokenizer."""
    from smartbrush_jax.config import ConfigError
    from smartbrush_jax.data.pipeline import DataConfig, latent_cache, uncached_dirs
    from smartbrush_jax.pretrained import load_tokenizer

    dirs = list(config.data.prepared_dirs)
    heldout_dirs = uncached_dirs(dirs)  # samples show images: a latent cache's source folder
    cache = latent_cache(dirs) if dirs else None
    if cache and os.path.realpath(cache["vae"]) != os.path.realpath(config.model.init_from or "-"):
        logging.warning("the latent cache was encoded with the VAE of %s, the run's model.init_from is %r: "
                        "the latents are only right if the two VAEs are the same", cache["vae"],
                        config.model.init_from)
    tok_dir = config.model.tokenizer
    if config.model.init_from and not tok_dir and os.path.isdir(os.path.join(config.model.init_from, "tokenizer")):
        tok_dir = os.path.join(config.model.init_from, "tokenizer")
    if config.data.synthetic_scenes > 0:
        train_dir, heldout_dir, synth_tok = build_synthetic(config, os.path.join(workdir, "data"))
        dirs, heldout_dirs = [train_dir] + dirs, [heldout_dir]
        tok_dir = tok_dir or synth_tok
    if not tok_dir:
        raise ConfigError("config.model.tokenizer: no tokenizer (give a folder, or init_from a diffusers folder)")
    tokenizer = load_tokenizer(tok_dir)
    pcount = jax.process_count()
    factor = 1 if config.model.autoencoder == "identity" else _vae_factor(config.model.init_from)
    common = dict(tokenizer_dir=tok_dir, resolution=config.data.resolution, latent_factor=factor,
                  caption_mix=config.data.caption_mix, min_mask_area=config.data.min_mask_area,
                  read_threads=config.data.read_threads, max_bad_fraction=config.data.max_bad_fraction)
    train = DataConfig(prepared_dirs=dirs, weights=dict(config.data.weights), seed=config.data.seed,
                       batch_size=config.train.batch_size // pcount, num_workers=config.data.num_workers, **common)
    heldout = DataConfig(prepared_dirs=heldout_dirs, weights={"seg": 1.0}, seed=config.data.seed + 1,
                         batch_size=config.train.num_sample_examples, shuffle=False, **common)
    return train, heldout, tokenizer


def _vae_factor(init_from: str) -> int:
    """The downsampling factor of a diffusers folder's VAE (8 for a single SD v1 file)."""
    path = os.path.join(init_from, "vae", "config.json")
    if not os.path.isfile(path):
        return 8
    with open(path) as f:
        return 2 ** (len(json.load(f).get("block_out_channels", (0, 0, 0, 0))) - 1)


def build_synthetic(config, root: str):
    """The bundled shapes set, prepared, plus a held-out set (other seed) and a tokenizer
    of its words; built once by process 0, reused on resume."""
    from smartbrush_jax.data.prepare import main as prepare_main
    from smartbrush_jax.data.synthetic import COLOURS, SHAPES, write_dataset
    from smartbrush_jax.data.tokenizer import write_word_tokenizer

    train_dir, heldout_dir, tok = (os.path.join(root, n) for n in ("prepared", "heldout", "tokenizer"))
    done = os.path.join(root, "READY")
    if jax.process_index() == 0 and not os.path.isfile(done):
        n, size = config.data.synthetic_scenes, config.data.synthetic_size
        print(f"building the synthetic shapes set: {n} scenes at {size}px in {root}", file=sys.stderr)
        for name, scenes, seed, out in (("train", n, 0, train_dir), ("heldout", max(8, n // 20), 1, heldout_dir)):
            raw = write_dataset(os.path.join(root, f"raw_{name}"), scenes, size, seed)
            args = ["--out", out, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                    "--captions", raw["captions"], "--webdataset", raw["image_text"],
                    "--overwrite"]  # a folder of an earlier, interrupted build of this run
            if prepare_main(args) != 0:
                raise RuntimeError("preparing the synthetic set failed")
        words = list(COLOURS) + list(SHAPES) + ["a", "small", "large", "with", "thin", "black", "outline", "on",
                                                "the", "left", "right", "in", "middle", "and", "background",
                                                "stripes", "checks", "gradient", "noise"]
        write_word_tokenizer(tok, [" ".join(words)])
        open(done, "w").close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data ready")
    return train_dir, heldout_dir, tok


def init_state(models, config, tx, mesh, rules):
    """Sharded train state and frozen params. From scratch: initialised by a jit with
    out_shardings from `eval_shape`, so nothing is materialised unsharded. From SD: the
    converted host arrays are placed straight into their shardings."""
    import flax.linen as nn
    from flax.core import meta

    from smartbrush_jax import sharding
    from smartbrush_jax.train_state import frozen_init_fn, init_state_fn, pretrained_frozen

    init = init_state_fn(models, tx, config.train.seed)
    boxed = jax.eval_shape(init)
    state_shardings = sharding.param_shardings(mesh, nn.get_partition_spec(boxed), rules, meta.unbox(boxed))
    finit = frozen_init_fn(models, config.train.seed)
    fboxed = jax.eval_shape(finit)
    frozen_shardings = sharding.param_shardings(mesh, nn.get_partition_spec(fboxed), rules, meta.unbox(fboxed))
    if models.pretrained is None:
        state = jax.jit(lambda: meta.unbox(init()), out_shardings=state_shardings)()
        frozen = jax.jit(lambda: meta.unbox(finit()), out_shardings=frozen_shardings)()
        return state, frozen, state_shardings, frozen_shardings
    params = jax.device_put(models.pretrained.unet_params, state_shardings["params"])
    frozen = jax.device_put(pretrained_frozen(models), frozen_shardings)

    def from_params(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                "ema": jax.tree_util.tree_map(jnp.copy, p),
                "rng": jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 2),
                "nonfinite_streak": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}

    state = jax.jit(from_params, out_shardings=state_shardings)(params)
    return state, frozen, state_shardings, frozen_shardings


class Samples:
    """Held-out inpainting grids: PNG in workdir/samples/ and an image in TensorBoard."""

    def __init__(self, models, config, empty_tokens, heldout_cfg, workdir, mesh):
        from smartbrush_jax.data.pipeline import make_dataset
        from smartbrush_jax.samples import heldout_levels, make_sample_fn

        self.enabled = bool(config.train.sample_every) and jax.process_index() == 0
        if not self.enabled:
            return
        it = iter(make_dataset(heldout_cfg))
        self.batch = next(it)
        self.levels = heldout_levels(heldout_cfg.batch_size, config.model.num_levels)
        self.fn = make_sample_fn(models, config, empty_tokens)
        self.workdir = workdir
        self.rng = jax.random.PRNGKey(config.train.seed + 99)

    def __call__(self, params, frozen, step, writer) -> float:
        if not self.enabled:
            return float("nan")
        from PIL import Image

        from smartbrush_jax.samples import grid, to_uint8

        b = {k: jnp.asarray(self.batch[k]) for k in ("image", "mask", "latent_mask", "tokens")}
        pixels, pred, user, iou = jax.device_get(self.fn(jax.device_get(params), jax.device_get(frozen), b,
                                                         jnp.asarray(self.levels), self.rng))
        g = grid(np.asarray(self.batch["image"]), to_uint8(pixels), np.asarray(pred), np.asarray(user))
        os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        Image.fromarray(g).save(path)
        writer.write_images(step, {"samples": g[None]})
        mean_iou = float(np.mean(iou))
        writer.write_scalars(step, {"heldout_iou": mean_iou})
        logging.info("samples at step %d: %s (held-out predicted-mask IoU %.3f)", step, path, mean_iou)
        return mean_iou


def check_config_file(argv) -> None:
    """ml_collections loads `--config` while absl parses the flags, where any problem is a
    traceback: look at the file first and exit 2 with one line saying what is wrong."""
    path = None
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return
    path = path.split(":", 1)[0]  # `file.py:arg` passes an argument to get_config
    problem = None
    if not os.path.isfile(path):
        problem = "no such file"
    elif not path.endswith(".py"):
        problem = "not a Python config file (configs/*.py, defining get_config())"
    else:
        import importlib.util

        try:
            spec = importlib.util.spec_from_file_location("smartbrush_config_check", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not callable(getattr(module, "get_config", None)):
                problem = "defines no get_config()"
        except Exception as e:  # whatever the file raises: SyntaxError, NameError, ImportError, ...
            problem = f"cannot be loaded ({type(e).__name__}: {e})"
    if problem:
        print(f"error: --config {path}: {problem}", file=sys.stderr)
        sys.exit(2)


def console():
    """Entry point of the `smartbrush-train` console script (and of `python -m`)."""
    check_config_file(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    console()
