"""Orbax checkpoints of a training run: the train state and the Grain iterator together,
plus `model.json` (what rebuilds the models) and the tokenizer, in the workdir: a local
folder or a `gs://` URL (`storage.py`; Orbax writes a bucket through TensorStore and marks
a finished step with its commit file, never by a rename).

    workdir/checkpoints/<step>/{state,data}   async, keep-last-N plus keep-every-K
    workdir/checkpoints/<step>.corrupt/       a step that failed to restore, moved aside
    workdir/model.json                        U-Net/text/VAE configs, autoencoder kind
    workdir/tokenizer/                        the tokenizer the run used
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

import grain
import orbax.checkpoint as ocp
from absl import logging

from smartbrush_jax import storage
from smartbrush_jax.errors import InputError


class CheckpointError(InputError):
    """Not a training run, nothing saved yet, or no checkpoint of it can be restored (the
    message says what each attempt raised)."""


def manager(workdir: str, keep_last: int, keep_every: int, async_save: bool = True) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save killed mid-way leaves `<step>.orbax-checkpoint-tmp-*`
    # (never a finished-looking step); it is removed when the next run opens the manager
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(keep_last, 1), keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, atomicity_options=atomicity(workdir))
    return ocp.CheckpointManager(storage.join(workdir, "checkpoints"), options=options, item_names=("state", "data"))


def atomicity(workdir: str):
    """Commit-file atomicity on a gcsfuse mount: Orbax would otherwise finalize a step by
    renaming its temporary folder, which gcsfuse does as a copy and delete of every object
    (neither atomic nor cheap: a preemption mid-rename leaves a half-copied step that looks
    finished). A `gs://` URL gets the commit file from Orbax itself; a local disk, renames."""
    if storage.mount_type(workdir) != storage.GCSFUSE:
        return None
    message = (f"{workdir} is on a gcsfuse mount: checkpoints are written in place and marked finished by "
               "their commit file, not renamed (better: give the gs:// URL itself as --workdir)")
    if message not in _said:
        _said.add(message)
        logging.warning(message)
        print(f"warning: {message}", file=sys.stderr)
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


_said = set()  # say the gcsfuse line once per process


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Optional[Any] = None):
    """Restore `state` into the shardings of `abstract_state` (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Optional[Any] = None,
                          all_agree: Callable[[bool], bool] = bool, is_primary: bool = True):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is
    none. A newer step that fails (a truncated file left by a host that died mid-write, a
    half-copied folder) is moved aside to `<step>.corrupt` and logged, but only once an
    older step has restored: when every step fails, the cause is more likely the run's
    config than the files, so nothing is moved and CheckpointError says what each raised.
    `all_agree(ok)`: True when every process restored the step (several processes read
    different shards of it)."""
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, ok = restore(mngr, step, abstract_state, data_iter), True
        except Exception as e:  # TensorStore, JSON, Orbax metadata: a damaged step raises many kinds
            state, ok = None, False
            failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        if all_agree(ok):
            for bad, reason in failed:
                _move_aside(mngr, bad, reason, is_primary)
            if failed:
                all_agree(True)  # an all-gather: every process waits for the renames before listing again
                mngr.reload()
            return step, state
        if ok:
            failed.append((step, "another process could not restore its part"))
    if failed:
        raise CheckpointError(f"{mngr.directory}: no checkpoint could be restored (nothing was moved or deleted): "
                              + "; ".join(f"step {s}: {r}" for s, r in failed))
    return None, None


def _move_aside(mngr: ocp.CheckpointManager, step: int, reason: str, is_primary: bool) -> None:
    src = storage.join(str(mngr.directory), str(step))
    dst = src + ".corrupt"
    n = 1
    while storage.exists(dst):
        n += 1
        dst = f"{src}.corrupt{n}"
    msg = f"checkpoint step {step} cannot be restored ({reason}); moved to {dst}, resuming from an older step"
    logging.warning(msg)
    print(f"warning: {msg}", file=sys.stderr)
    if is_primary:
        storage.rename(src, dst)


def restore_params(workdir: str, step: Optional[int] = None, ema: bool = True):
    """The U-Net params (EMA by default) of a run, on the host, for inpainting and export.
    Without `step`: the newest step that restores (a damaged newer one is reported and
    skipped, never moved: readers do not change a run)."""
    step, state = restore_state(workdir, step)
    return step, state["ema" if ema else "params"]


def restore_state(workdir: str, step: Optional[int] = None, like: Any = None):
    """(step, the whole train state) of a run, on this process's first device, whatever
    topology saved it (8 devices, a pod): every array is restored whole from the shapes
    the checkpoint records. `like`: a state (or its eval_shape) whose tree structure the
    result takes (optax's state classes instead of plain dicts), so the step can run on it."""
    ckpt_dir = storage.join(workdir, "checkpoints")
    if not storage.isdir(ckpt_dir):
        raise CheckpointError(f"{workdir}: no checkpoints/ folder: not a training workdir, or nothing saved yet")
    import jax

    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                                 item_handlers={"state": ocp.StandardCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise CheckpointError(f"{workdir}: no finished checkpoint")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    errors = []
    for s in steps:
        try:
            meta = mngr.item_metadata(s)["state"] if like is None else like
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
            state = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # a damaged step: try the next older one
            if step is not None:
                raise CheckpointError(f"{ckpt_dir}/{s} cannot be restored: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:300]}") from None
            errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        if errors:
            print(f"warning: {ckpt_dir}: using step {s}; newer steps cannot be restored ({'; '.join(errors)})",
                  file=sys.stderr)
        return s, state
    raise CheckpointError(f"{ckpt_dir}: no checkpoint can be restored: {'; '.join(errors)}")


def read_model_config(workdir: str) -> dict:
    path = storage.join(workdir, "model.json")
    if not storage.isfile(path):
        raise CheckpointError(f"{workdir}: no model.json: not a training workdir")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
