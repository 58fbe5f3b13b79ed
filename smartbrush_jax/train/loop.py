"""The trainer, callable from Python: `run(config, workdir)` trains SmartBrush.

    from smartbrush_jax.train.loop import run             # (config: configs/*.py's get_config())
    summary = run(config, "runs/x")                    # one process
    run(config, "runs/x", distributed=Distributed(auto=True))   # every process of a pod / SLURM job

A sharded, jitted, donated train step (encode, text dropout, degrade the mask, U-Net,
MSE + DICE, AdamW, EMA) over a Grain pipeline, with Orbax checkpoints (state and data
iterator together), automatic resume, SIGTERM-safe exits and clu metrics. Read top to
bottom: run -> setup (processes, data, models, state, checkpoint, step) -> train_loop.
The command is `smartbrush_jax/cli/train.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from clu import metric_writers, periodic_actions  # noqa: E402

from smartbrush_jax import checkpoints, storage  # noqa: E402
from smartbrush_jax.config import ConfigError, validate  # noqa: E402
from smartbrush_jax.data.pipeline import DataError, latent_cache, make_dataset, uncached_dirs  # noqa: E402
from smartbrush_jax.data.validate import SKIP_REASONS  # noqa: E402
from smartbrush_jax.distributed import Distributed  # noqa: E402,F401  (part of this API)
from smartbrush_jax.models.attention import describe  # noqa: E402
from smartbrush_jax.models.tokenizer import load_tokenizer  # noqa: E402
from smartbrush_jax.planning import flops, xla  # noqa: E402
from smartbrush_jax.preemption import StopRequest  # noqa: E402
from smartbrush_jax.settings import DataConfig, SettingsError, from_section  # noqa: E402
from smartbrush_jax.train import sharding  # noqa: E402
from smartbrush_jax.train.heldout import HeldoutGrids  # noqa: E402
from smartbrush_jax.train.prefetch import DevicePrefetch  # noqa: E402
from smartbrush_jax.train.step import abstract, build_models, build_step, loss_config  # noqa: E402
from smartbrush_jax.train.workdir_lock import WorkdirLock  # noqa: E402

# what the step reads from a batch: `image` from prepared folders, `latent_mean`/`latent_logvar` from latent caches;
# `micro` (the crop's size and offsets) only where the U-Net takes SDXL's micro-conditioning
BATCH_KEYS = ("image", "latent_mean", "latent_logvar", "mask", "latent_mask", "tokens")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); exit code 1."""


def run(config, workdir: str, *, distributed: Optional[Distributed] = None,
        corrupt_grads: Optional[Callable] = None) -> dict:
    """Trains to `config.train.steps` and returns the summary, or stops at SIGTERM after
    saving (then the summary has `"stopped": True` and no summary.json is written, so a
    job script can tell). The SIGTERM handler and the data pipeline live for this call only.
    `corrupt_grads(grads, step) -> grads` is fault injection for tests."""

    with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever happens
        stop = StopRequest().install()  # before any slow start-up work
        cleanup.callback(stop.uninstall)
        (distributed or Distributed()).initialize()
        if stop.attach_to_jax():
            logging.info("SIGTERM is handled by JAX's preemption service (the stop step is agreed between processes)")
        s = setup(config, workdir, cleanup, corrupt_grads)
        try:
            return train_loop(s, stop)
        except Exception as e:
            if checkpoints.disk_full(e):  # one line, not a traceback per failed write
                raise checkpoints.DiskFull(checkpoints.disk_full_message(e, s.manager)) from e
            raise


# ---------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once."""

    config: Any
    workdir: str
    models: Any
    tokenizer: Any
    mesh: Any
    state: Any  # TrainState, sharded; restored when the run resumes
    frozen: Any
    start: int  # the step the run starts (or resumes) from
    step_fn: Any  # jitted, sharded, donating
    data_iter: Any
    manager: Any  # Orbax CheckpointManager
    heldout_cfg: Any
    empty_tokens: np.ndarray
    model_flops: float


def setup(config, workdir: str, cleanup: contextlib.ExitStack, corrupt_grads=None) -> Setup:

    # ------------------------------------------------------------------ processes, config
    pidx, pcount = jax.process_index(), jax.process_count()
    validate(config, jax.device_count(), pcount)
    storage.makedirs(workdir)
    if pidx == 0:  # one run per workdir: a second trainer is refused here, before it touches anything
        cleanup.enter_context(WorkdirLock(workdir))
    logging.info("process %d/%d, %d devices (%s)", pidx, pcount, jax.device_count(), jax.devices()[0].platform)

    # ------------------------------------------------------------------ data, tokenizer, models
    dirs, heldout_dirs, tokenizer = data_sources(config, workdir)
    models = build_models(config, len(tokenizer))
    train_cfg, heldout_cfg = data_configs(config, dirs, heldout_dirs, tokenizer.name_or_path, models.latent_factor)
    if models.text2 is not None:
        check_micro_recorded(dirs)
    from smartbrush_jax.data.latents import check_run_vae

    check_run_vae(dirs, models, config.model.init_from)  # a latent cache of another VAE: refused by name
    empty_tokens = np.asarray(tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids,
                              np.int32)
    mesh = sharding.make_mesh(dict(config.mesh.shape), dict(config.mesh.dcn_shape))

    # ------------------------------------------------------------------ state, step
    state, frozen, step_fn = build_step(config, models, mesh, empty_tokens, corrupt_grads)

    # ------------------------------------------------------------------ checkpoint: resume
    data_iter = iter(make_dataset(train_cfg, pidx, pcount))
    cleanup.callback(data_iter.close)  # ends Grain's worker processes and frees their shared memory
    mngr = checkpoints.manager(workdir, config.train.keep_last, config.train.keep_every)
    start, restored = checkpoints.restore_newest_intact(mngr, abstract(state), data_iter,
                                                        _all_agree if pcount > 1 else bool, is_primary=pidx == 0)
    if start is None:
        start = 0
    else:
        state = restored
        logging.info("resumed from step %d", start)
        print(f"resumed from step {start}", file=sys.stderr)
    if pidx == 0:
        write_run_files(workdir, run_model_config(config, models), tokenizer.name_or_path,
                                    None if config.model.init_from else frozen)
    latent = train_cfg.resolution // models.latent_factor
    model_flops = flops.train_step_flops(flops.unet_forward_flops(
        models.unet.config, config.train.batch_size, latent, latent, len(empty_tokens)))
    return Setup(config, workdir, models, tokenizer, mesh, state, frozen, start, step_fn, data_iter, mngr,
                 heldout_cfg, empty_tokens, model_flops)


def run_model_config(config, models) -> dict:
    """model.json: what rebuilds the models and samples like the run (inpaint, export, demo)."""

    return {**models.model_config(), "num_levels": config.model.num_levels,
            "init_from": storage.absolute(config.model.init_from) if config.model.init_from else "",
            "init_ema": config.model.init_ema, "resolution": config.data.resolution,
            "degrade": loss_config(config).degrade,
            "sampler": {"sampler": config.train.sample_sampler, "num_steps": config.train.sample_steps,
                        "guidance_scale": config.train.sample_guidance}}


def write_run_files(workdir: str, model_config: dict, tokenizer_dir: str, frozen=None) -> None:
    """model.json, the tokenizer and, for a run from scratch, the frozen (random) text
    encoder as `frozen_text.safetensors` (a run from SD weights names `init_from`)."""
    storage.makedirs(workdir)
    if frozen is not None:
        import jax
        from safetensors.numpy import save

        from smartbrush_jax.interop.weights import flax_to_torch

        storage.write_bytes(storage.join(workdir, "frozen_text.safetensors"),
                            save(flax_to_torch(jax.device_get(frozen["text"]))))
    storage.write_text(storage.join(workdir, "model.json"), json.dumps(model_config, indent=2))
    dst = storage.join(workdir, "tokenizer")
    if storage.absolute(tokenizer_dir) != dst:
        storage.upload(storage.local_copy(tokenizer_dir), dst)


def data_sources(config, workdir: str):
    """(training folders, held-out folders, tokenizer): the config's prepared folders, plus
    the bundled shapes set when `data.synthetic_scenes` > 0."""

    dirs = list(config.data.prepared_dirs)
    remote = [d for d in dirs if storage.is_remote(d)]
    if remote:
        raise ConfigError(f"config.data.prepared_dirs: {remote[0]} is a URL, and Grain reads ArrayRecord shards from "
                          "local paths: mount the bucket with gcsfuse (launch/tpu_vm.sh does, read-only with a "
                          "file cache) and give the mounted path")
    heldout_dirs = uncached_dirs(dirs)  # samples show images: a latent cache's source folder
    cache = latent_cache(dirs) if dirs else None
    if cache and os.path.realpath(cache["vae"]) != os.path.realpath(config.model.init_from or "-"):
        logging.warning("the latent cache was encoded with the VAE of %s, the run's model.init_from is %r: "
                        "the latents are only right if the two VAEs are the same", cache["vae"],
                        config.model.init_from)
    tok_dir = config.model.tokenizer
    if config.model.init_from and not tok_dir and storage.isdir(storage.join(config.model.init_from, "tokenizer")):
        tok_dir = storage.join(config.model.init_from, "tokenizer")
    if config.data.synthetic_scenes > 0:
        if storage.is_remote(workdir):
            raise ConfigError(f"config.data.synthetic_scenes: the shapes set is built in the workdir, and {workdir} "
                              "is a URL (Grain reads local shards): build it on a local disk (python -m "
                              "smartbrush_jax.cli.synthetic; smartbrush-prepare) and give it in data.prepared_dirs")
        train_dir, heldout_dir, synth_tok = build_synthetic(config, workdir)
        dirs, heldout_dirs = [train_dir] + dirs, [heldout_dir]
        tok_dir = tok_dir or synth_tok
    if not tok_dir:
        raise ConfigError("config.model.tokenizer: no tokenizer (give a folder, or init_from a diffusers folder)")
    return dirs, heldout_dirs, load_tokenizer(storage.local_copy(tok_dir))


def check_micro_recorded(dirs) -> None:
    """SDXL trains on each crop's micro-conditioning: every latent cache must have stored it
    (caches written before it was recorded hold only the crop box, not the source size).
    Prepared folders need nothing: the pipeline computes it from each crop."""
    from smartbrush_jax.data.pipeline import latent_cache

    old = [d for d in dirs if not (latent_cache([d]) or {"micro": True}).get("micro")]
    if old:
        raise ConfigError(f"the latent cache {old[0]} does not record the crops' original size and offsets "
                          "(SDXL's micro-conditioning): rebuild it with this version's "
                          "`python -m smartbrush_jax.cli.latents`")


def data_configs(config, dirs, heldout_dirs, tokenizer_dir: str, latent_factor: int):
    """The DataConfigs of training (this host's share of the batch) and of the held-out grids."""

    try:
        train = from_section(DataConfig, config.data, prepared_dirs=dirs, tokenizer_dir=tokenizer_dir,
                             latent_factor=latent_factor, batch_size=config.train.batch_size // jax.process_count())
    except SettingsError as e:
        raise ConfigError(f"config.{e}") from None
    heldout = dataclasses.replace(train, prepared_dirs=heldout_dirs, weights={"seg": 1.0}, seed=train.seed + 1,
                                  batch_size=config.train.num_sample_examples, shuffle=False, num_workers=0)
    return train, heldout


def build_synthetic(config, workdir: str):
    """The bundled shapes set of the run (`data/synthetic.py`), built once by process 0 and
    reused on resume: (training folder, held-out folder, tokenizer folder)."""
    from smartbrush_jax.data.synthetic import build_run_set, run_set_dirs

    if jax.process_index() == 0:
        build_run_set(workdir, config.data.synthetic_scenes, config.data.synthetic_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data ready")
    dirs = run_set_dirs(workdir)
    return dirs["prepared"], dirs["heldout"], dirs["tokenizer"]


def _all_agree(ok: bool) -> bool:
    """True when `ok` on every process (an all-gather: also a barrier)."""
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


# ---------------------------------------------------------------------------------- train loop
def startup_report(compiled, s: Setup, peak) -> dict:
    """The compiled step's memory per device against the accelerator's (the margin), its
    collectives and the step-time estimate: the same report, by the same code
    (`aot.compiled_report`), as `python -m smartbrush_jax.cli.aot` gives before a pod is
    booked, logged on the real hardware; the log then sets the measured step beside it."""
    from smartbrush_jax.planning import estimate
    from smartbrush_jax.train.aot import compiled_report

    device = jax.devices()[0]
    r = compiled_report(compiled, s.config, s.models, estimate.spec_of_device(device, peak), jax.device_count(),
                        device.platform, hbm_bytes=xla.device_hbm_bytes(device))
    logging.info("compiled step: attention %s; remat %s", describe(s.config.model.attention, device.platform,
                                                                   s.config.model.splash_min_tokens),
                 s.config.model.remat)
    for line in xla.format_report(r).splitlines():
        logging.info("compiled step: %s", line)
    if r["memory"].get("fits") is False:
        logging.warning("the compiled step needs more memory per device than %s has: expect an out-of-memory "
                        "error (python -m smartbrush_jax.cli.aot --find-max-batch finds what fits)", device.device_kind)
    return r


def train_loop(s: Setup, stop) -> dict:


    config, workdir, mngr, start = s.config, s.workdir, s.manager, s.start
    pidx, pcount = jax.process_index(), jax.process_count()
    events = EventsDir(workdir)
    writer = metric_writers.create_default_writer(events.local, just_logging=pidx > 0)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.train.steps, writer=writer,
                                             every_steps=config.train.log_every)]
    if config.train.profile_steps and pidx == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps, logdir=events.local,
                                              first_profile=start + 10))
    grids = HeldoutGrids(s.models, config, s.empty_tokens, s.heldout_cfg, workdir)
    peak = config.train.peak_tflops * 1e12 or flops.peak_flops_per_device(jax.devices()[0])
    keys = BATCH_KEYS + (("micro",) if s.models.text2 is not None else ())
    batches = DevicePrefetch(s.data_iter, lambda local: (local["skips"].sum(0), sharding.shard_batch(
        s.mesh, {k: local[k] for k in keys if k in local})), config.data.prefetch_to_device)
    state, step, history, skips, flop_report, estimated = s.state, start, [], None, {}, {}
    check_every = max(1, min(config.train.log_every, config.train.max_nonfinite_in_a_row))
    t0 = time.time()

    def finish_early(read_error=None) -> dict:
        """SIGTERM, or on one process a data pipeline that failed: save this step unless it
        is in a non-finite streak, say which checkpoint is the latest; then return (SIGTERM)
        or raise (DataError: too many bad records, exit 2; anything else: exit 1)."""
        streak = int(jax.device_get(state.nonfinite_streak))
        if streak == 0 and step > start:
            checkpoints.save(mngr, step, state, batches.consumed_state(), force=True)
        mngr.wait_until_finished()
        writer.flush()
        events.sync()
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
        if step == start:  # compile here (the call below reuses it) for XLA's FLOP count and memory
            compiled = s.step_fn.lower(state, s.frozen, batch).compile()
            report = startup_report(compiled, s, peak)
            flop_report, estimated = report["flops"], report["estimate"]
            window = (time.time(), step)  # throughput is measured between log points
        state, metrics = s.step_fn(state, s.frozen, batch)
        step += 1
        stopping = stop.should_stop(step)  # on every process at every step (JAX's sync point needs it)
        if step < config.train.steps and not stopping:
            got = read(take=False)  # read and transfer the next batch while the device runs this step
            if isinstance(got, Exception):
                return finish_early(got)
        for h in hooks:
            h(step)
        last = step == config.train.steps
        if step % check_every == 0 or step % config.train.log_every == 0 or last:
            m = jax.device_get(metrics)
            if int(m["nonfinite_streak"]) >= config.train.max_nonfinite_in_a_row:
                mngr.wait_until_finished()
                raise TrainingError(
                    f"{int(m['nonfinite_streak'])} non-finite steps in a row (loss or gradient) at step {step}; "
                    f"stopped. The last good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints")
            if step % config.train.log_every == 0 or last:
                scalars = {k: float(v) for k, v in m.items()}
                scalars.update({f"data_skipped/{r}": float(c) for r, c in zip(SKIP_REASONS, skips)})
                step_s = (time.time() - window[0]) / (step - window[1])
                speed = flops.throughput(s.model_flops, step_s, jax.device_count(), peak)
                speed["step_seconds"] = step_s
                if estimated.get("seconds"):  # the planner's error on this program: recalibrates it
                    speed["measured_over_estimated"] = step_s / estimated["seconds"]
                window = (time.time(), step)
                scalars.update(speed)
                writer.write_scalars(step, scalars)
                history.append({"step": step, **{k: scalars[k] for k in ("loss", "mse", "dice", "iou")}, **speed})
        if stopping:
            return finish_early()
        if step % config.train.checkpoint_every == 0 or last:
            streak = int(jax.device_get(state.nonfinite_streak))
            if streak == 0:
                checkpoints.save(mngr, step, state, batches.consumed_state(), force=True)
                events.sync()
            else:
                logging.warning("step %d: checkpoint skipped (%d non-finite steps in a row); the latest is step %s",
                                step, streak, mngr.latest_step())
        if config.train.sample_every and (step % config.train.sample_every == 0 or last):
            history.append({"step": step, "heldout_iou": grids(state.ema, s.frozen, step, writer)})
            window = (time.time(), step)  # sampling is not training time
    mngr.wait_until_finished()
    writer.flush()
    events.sync()
    summary = {"steps": step, "seconds": time.time() - t0, "history": history, "flops": flop_report,
               "estimate": estimated,
               "nonfinite_total": int(jax.device_get(state.nonfinite_total))}
    name = "summary.json" if pidx == 0 else f"summary_process{pidx}.json"
    storage.write_text(storage.join(workdir, name), json.dumps(summary, indent=1))
    return summary


class EventsDir:
    """Where clu's TensorBoard events go: the workdir itself when it is local; for a URL a
    local folder mirrored into it (`sync`, at every checkpoint and at the end), since
    TensorFlow's file system does not reach every store (an emulator, a proxy) that the
    rest of the run writes through `storage`."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.local = workdir
        if storage.is_remote(workdir):
            import hashlib
            import tempfile

            self.local = os.path.join(tempfile.gettempdir(), "smartbrush_events",
                                      hashlib.sha1(workdir.encode()).hexdigest()[:16])
            os.makedirs(self.local, exist_ok=True)

    def sync(self) -> None:
        if self.local != self.workdir and os.listdir(self.local):
            storage.upload(self.local, self.workdir)
