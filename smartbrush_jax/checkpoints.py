"""Orbax checkpoints of a training run: the train state and the Grain iterator together,
plus `model.json` (what rebuilds the models) and the tokenizer, in the workdir: a local
folder or a `gs://` URL (`storage.py`; Orbax writes a bucket through TensorStore and marks
a finished step with its commit file, never by a rename).

    workdir/checkpoints/<step>/{state,data}   async, keep-last-N plus keep-every-K
    workdir/checkpoints/<step>/checksums      every array's checksum (`array_checksums.py`), checked on every read
    workdir/checkpoints/<step>.corrupt/       a step shown damaged (`damage`), moved aside
    workdir/model.json                        U-Net/text/VAE configs, autoencoder kind
    workdir/tokenizer/                        the tokenizer the run used
"""

from __future__ import annotations

import errno
import json
import re
import sys
from typing import Any, Callable, Optional

import grain
import orbax.checkpoint as ocp
from absl import logging

from smartbrush_jax import array_checksums as checksums
from smartbrush_jax import storage
from smartbrush_jax.errors import Failure, InputError

ITEMS = ("state", "data", "checksums")  # the items of every step (a step saved before checksums lacks the last)


class CheckpointError(InputError):
    """Not a training run, nothing saved yet, or no checkpoint of it can be restored (the
    message says what each attempt raised)."""


class CheckpointFailure(Failure):
    """A step that did not restore for a reason other than damage to its files (a network
    or credentials error, a bug): nothing was moved; exit 1 with the one line."""


class DiskFull(Failure):
    """A save that ran out of space; the message names the step and the last good one."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write that found no space left: ENOSPC, or
    TensorStore's RESOURCE_EXHAUSTED carrying it."""
    for x in _chain(exc):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        text = str(x)
        if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "os_error_code='28'" in text):
            return True
    return False


def disk_full_message(exc: BaseException, mngr: ocp.CheckpointManager, step: Optional[int] = None) -> str:
    """"disk full while saving step N; the last good checkpoint is M" with what to do. The
    step is read from the error (an async save fails at the next call, a step later)."""
    for x in _chain(exc):
        found = re.search(r"checkpoints/(\d+)(?:\.orbax-checkpoint-tmp|/)", str(x))
        if found:
            step = int(found.group(1))
            break
    try:
        mngr.reload()
        good = mngr.latest_step()
    except Exception:  # noqa: BLE001  (the directory as it is on disk is the fallback)
        good = None
    if step is None:  # the newest step folder on disk past the last good one: the save that failed
        try:
            names = [p.name for p in storage.P(str(mngr.directory)).iterdir()]
        except OSError:
            names = []
        tried = [int(m.group(1)) for m in (re.match(r"(\d+)", n) for n in names) if m]
        tried = [t for t in tried if good is None or t > good]
        step = max(tried) if tried else None
    where = storage.join(str(mngr.directory))
    return (f"disk full while saving step {step if step is not None else '?'} in {where}; the last good checkpoint "
            f"is {good if good is not None else 'none'}: free some space and run the same command again to resume "
            "from it (the unfinished save is removed then)")


def _drop_disk_full_noise(record) -> bool:
    """asyncio logs every failed write of an async save ("Task exception was never
    retrieved"): hundreds of lines for one full disk, which `DiskFull` says once."""
    exc = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    return not ((exc is not None and disk_full(exc)) or ("No space left on device" in text))


def _closed_loop(unraisable) -> bool:
    """A TensorStore write finishing after the event loop that awaited it was closed: an
    aborted async save (a full disk) leaves such writes, and each one's done-callback
    reports "Event loop is closed" through `sys.unraisablehook`, a traceback apiece."""
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _abandoned_damaged_read(unraisable) -> bool:
    """A read of a damaged step's other arrays, abandoned when the first one failed: its
    coroutine is collected later and reports the same damage ("Exception ignored in
    coroutine ... Traceback") although the step was already reported and skipped."""
    exc = unraisable.exc_value
    return exc is not None and damage(exc) is not None


def _quiet_aborted_writes() -> None:
    """Drop the closed-loop reports of `_closed_loop` (the save's failure is said once, by
    `DiskFull`) and the abandoned reads of `_abandoned_damaged_read` (the damage is said
    once, by the restore that met it); every other unraisable exception still goes to the
    hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "_smartbrush", False):
        return

    def hook(unraisable):
        if not (_closed_loop(unraisable) or _abandoned_damaged_read(unraisable)):
            previous(unraisable)

    hook._smartbrush = True
    sys.unraisablehook = hook


def manager(workdir: str, keep_last: int, keep_every: int, async_save: bool = True) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save killed mid-way leaves `<step>.orbax-checkpoint-tmp-*`
    # (never a finished-looking step); it is removed when the next run opens the manager
    import logging as std_logging

    for name in ("asyncio", "absl"):  # asyncio's task errors; Orbax's own (through absl); added once
        std_logging.getLogger(name).addFilter(_drop_disk_full_noise)
    _quiet_aborted_writes()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(keep_last, 1), keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, atomicity_options=atomicity(workdir))
    return ocp.CheckpointManager(storage.join(workdir, "checkpoints"), options=options, item_names=ITEMS)


def atomicity(workdir: str):
    """Commit-file atomicity on a gcsfuse mount: Orbax would otherwise finalize a step by
    renaming its temporary folder, which gcsfuse does as a copy and delete of every object
    (neither atomic nor cheap: a preemption mid-rename leaves a half-copied step that looks
    finished). A `gs://` URL gets the commit file from Orbax itself; a local disk, renames."""
    if storage.mount_type(workdir) != storage.GCSFUSE:
        return None
    message = (f"{workdir} is on a gcsfuse mount: checkpoints are written in place and marked finished by "
               "their commit file, not renamed (better: give the gs:// URL itself as --workdir)")
    _say_once(message)
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


_said = set()  # the warnings said once per process


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logging.warning(message)
        print(f"warning: {message}", file=sys.stderr)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    """Save `state`, the iterator and every array's checksum as one step (each process sums
    the shards it holds, then the processes add their sums: every process calls save)."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(data_iter),
                                                   checksums=ocp.args.JsonSave(checksums.compute(state))), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Optional[Any] = None):
    """Restore `state` into the shardings of `abstract_state` (and the iterator in place),
    checked against the checksums saved with it (`checksums.ChecksumMismatch`: damage)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    state = mngr.restore(step, args=ocp.args.Composite(**items))["state"]
    verify(mngr, step, state)
    return state


def verify(mngr: ocp.CheckpointManager, step: int, state: Any) -> Optional[int]:
    """Check a restored step's arrays against its `checksums` item: the number checked, or
    None for a step saved before checksums were written (said once per step and process)."""
    if not storage.exists(storage.join(str(mngr.directory), str(step), "checksums")):
        _say_once(f"{mngr.directory}/{step} was saved without checksums (before they were written): "
                  "its arrays cannot be verified")
        return None
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
    except Exception as e:  # noqa: BLE001  an unreadable record is damage to the step like any other file
        raise checksums.ChecksumMismatch("(the checksum record)", step, _first_line(e)) from e
    return checksums.verify(state, saved, step)


# TensorStore's status codes for files that are missing, short or fail their checks (a
# truncated chunk is OUT_OF_RANGE, a deleted one FAILED_PRECONDITION or NOT_FOUND, a
# garbled manifest DATA_LOSS); a network, permission or timeout error has other codes
_DAMAGE_CODES = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION): .*(Error reading|Error opening|"
                           r"Metadata at|Invalid JSON|Truncated|checksum|ZSTD|decode)", re.S)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def damage(exc: BaseException) -> Optional[str]:
    """Why a failed restore shows the step's own files damaged (a file missing, short,
    unparsable or failing TensorStore's checks), or None when it does not: a bug, a network
    or credentials error, a version change, an import that failed. Only damage moves a
    step aside; anything else could demote every good step in turn."""
    for x in _chain(exc):
        if isinstance(x, checksums.ChecksumMismatch):
            return str(x)
        # a metadata file with bytes that are not UTF-8 (flipped, its size unchanged) fails
        # before it is parsed: UnicodeDecodeError, as much damage as JSON that does not parse
        if isinstance(x, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)) or _DAMAGE_CODES.match(str(x)):
            return _first_line(x)
    return None


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Optional[Any] = None,
                          all_agree: Callable[[bool], bool] = bool, is_primary: bool = True):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is
    none. A newer step shown damaged (`damage`: a truncated file left by a host that died
    mid-write, a half-copied folder) is moved aside to `<step>.corrupt` and logged, but only
    once an older step has restored: when every step fails, the cause is more likely the
    run's config than the files, so nothing is moved and CheckpointError says what each
    raised. A failure that is not damage stops here with that error, nothing moved.
    `all_agree(ok)`: True when every process says ok (several processes read different
    shards of a step)."""
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        error = None
        try:
            state, ok = restore(mngr, step, abstract_state, data_iter), True
        except Exception as e:  # noqa: BLE001  (sorted below: damage, or a reason to stop)
            state, ok, error = None, False, e
        why = damage(error) if error is not None else None
        if not all_agree(error is None or why is not None):
            if error is not None and why is None:
                raise CheckpointFailure(
                    f"{mngr.directory}/{step} did not restore, and not because its files are damaged "
                    f"({_first_line(error)}); nothing was moved: fix the cause and run again") from error
            raise CheckpointFailure(f"{mngr.directory}/{step}: another process could not restore its part, and "
                                    "not because the files are damaged; nothing was moved")
        if all_agree(ok):
            for bad, reason in failed:
                _move_aside(mngr, bad, reason, is_primary)
            if failed:
                all_agree(True)  # an all-gather: every process waits for the renames before listing again
                mngr.reload()
            return step, state
        failed.append((step, why if why is not None else "another process could not restore its part"))
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

    _quiet_aborted_writes()
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "checksums": ocp.JsonCheckpointHandler()},
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
            state = restore(mngr, s, target)
        except Exception as e:  # noqa: BLE001  a damaged step: try the next older one
            mismatch = next((x for x in _chain(e) if isinstance(x, checksums.ChecksumMismatch)), None)
            if mismatch is not None:  # bytes that changed without a trace: never used, never skipped quietly
                older = [o for o in mngr.all_steps() if o < s]
                raise CheckpointError(
                    f"checkpoint step {s} in {ckpt_dir} is damaged: {mismatch}. Nothing was used or changed; "
                    "the trainer moves such a step aside when it resumes (readers then take the newest good step)"
                    + (f"; `smartbrush-export --step {max(older)}` reads the newest older one" if older else "")
                ) from None
            if step is not None:
                raise CheckpointError(f"{ckpt_dir}/{s} cannot be restored: {_first_line(e)}") from None
            why = damage(e)
            if why is None:
                raise CheckpointFailure(f"{ckpt_dir}/{s} did not restore, and not because its files are damaged "
                                        f"({_first_line(e)})") from e
            errors.append(f"step {s}: {why}")
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
