"""Output folders that never destroy what the command did not make.

Every command that writes a whole folder (export, convert, prepare, latents) checks its
`--out` before any work (`check_output`) and then builds it beside the target and swaps
it in when complete (`building`):

- `--out` may not be a file or a symlink, and may not equal, contain or lie inside one of
  the command's inputs (`export --workdir runs/x --out runs/x` would replace the run).
- It must be creatable: not under a file, in a folder this process can write (a probe
  file is made and removed, so /proc, a read-only mount or a folder of another user are
  told apart), with the free space the command says it needs.
- An existing, non-empty `--out` is replaced only with `--overwrite`, and only when it is
  a folder this kind of command wrote (`is_ours(path)`: an export holds `smartbrush.json`,
  a prepared folder our `metadata.json`, ...); anything else is refused.
- The new folder is written as `OUT.partial`, holding the marker `.smartbrush-partial`
  while incomplete, then renamed to `OUT` (the old one is moved aside first and removed
  only after the swap). A `OUT.partial` with the marker is ours from an interrupted run
  and is replaced; one without it is somebody else's and is refused.
- A `gs://` OUT is built in a local temporary folder and uploaded when complete, its
  marker files (metadata.json, model_index.json, run.json) last, so a reader that looks
  for the marker never sees half a folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterable, Optional

from smartbrush_jax import storage
from smartbrush_jax.errors import InputError

PARTIAL_MARKER = ".smartbrush-partial"


class OutputError(InputError):
    """An output folder the command may not write or replace."""


def partial_path(out: str) -> str:
    return os.path.normpath(out) + ".partial"


def check_output(out: str, inputs: Iterable[str] = (), is_ours: Optional[Callable[[str], bool]] = None,
                 overwrite: bool = False, flag: str = "--out", what: str = "folder", need_bytes: int = 0) -> None:
    """Raise OutputError unless `out` may be written (see the module docstring);
    `need_bytes`: the free space the output needs beside it."""
    if storage.is_remote(out):
        return _check_remote(out, inputs, is_ours, overwrite, flag, what)
    if os.path.islink(os.path.normpath(out)):
        raise OutputError(f"{flag} {out} is a symbolic link: give the real folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{flag} {out} is a file, not a folder")
    check_writable(out, flag, need_bytes)
    real = os.path.realpath(out)
    for src in inputs:
        if not src:
            continue
        r = os.path.realpath(src)
        if real == r:
            raise OutputError(f"{flag} {out} is the input {src} itself: choose another {flag}")
        if r.startswith(real + os.sep):
            raise OutputError(f"{flag} {out} contains the input {src}: replacing it would delete the input")
        if real.startswith(r + os.sep):
            raise OutputError(f"{flag} {out} lies inside the input {src}: write it somewhere else")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise OutputError(f"{flag} {out} exists and is not empty: choose another {flag} or pass --overwrite")
        if is_ours is None or not is_ours(out):
            raise OutputError(f"{flag} {out} is not empty and not a {what} this command wrote, so it is left "
                              "alone: choose another folder")
    partial = partial_path(out)
    if os.path.lexists(partial) and not os.path.isfile(os.path.join(partial, PARTIAL_MARKER)):
        raise OutputError(f"{partial} exists and was not left by this command: remove it or choose another {flag}")


def check_writable(out: str, flag: str = "--out", need_bytes: int = 0) -> None:
    """OutputError unless `out` (a local folder, existing or not) can be created and written:
    its nearest existing parent is a folder, a probe file can be made in it (the partial
    folder goes beside `out`), and `need_bytes` are free there."""
    path = os.path.abspath(out)
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{flag} {out} lies under {parent}, which is a file, not a folder")
    beside = os.path.dirname(path) if os.path.isdir(os.path.dirname(path)) else parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".smartbrush-probe-", dir=beside)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{flag} {out}: cannot write in {beside} ({e.strerror or e}): choose a folder you can "
                          "write") from None
    if need_bytes:
        free = shutil.disk_usage(beside).free
        if free < need_bytes:
            raise OutputError(f"{flag} {out}: {free / 2**20:.0f} MiB free in {beside}, the output needs about "
                              f"{need_bytes / 2**20:.0f} MiB: free some space or choose another folder")


def _check_remote(out, inputs, is_ours, overwrite, flag, what) -> None:
    target = out.rstrip("/")
    for src in inputs:
        if not src:
            continue
        s = storage.absolute(src).rstrip("/")
        if target == s or s.startswith(target + "/") or target.startswith(s + "/"):
            raise OutputError(f"{flag} {out} is, holds or lies inside the input {src}: choose another {flag}")
    if storage.isdir(out) and any(True for _ in storage.P(out).iterdir()):
        if not overwrite:
            raise OutputError(f"{flag} {out} exists and is not empty: choose another {flag} or pass --overwrite")
        if is_ours is None or not is_ours(out):
            raise OutputError(f"{flag} {out} is not empty and not a {what} this command wrote, so it is left "
                              "alone: choose another folder")


@contextlib.contextmanager
def building(out: str, keep_on_failure: bool = False, resume: bool = False):
    """`with building(out) as tmp:` write the folder into `tmp`; when the block ends
    normally `tmp` becomes `out` (replacing an existing `out`, which `check_output`
    allowed). On an exception `tmp` is removed, or kept with its marker when
    `keep_on_failure` (finished work a rerun can use); the exception propagates. With
    `resume`, the `OUT.partial` of an interrupted run of ours is handed back as it is (the
    command decides what in it to keep) instead of being emptied."""
    if storage.is_remote(out):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="smartbrush_out_") as tmp:
            yield tmp
            if storage.exists(out):  # an earlier output of ours (check_output allowed it)
                storage.P(out).rmtree()
            storage.upload(tmp, out)
        return
    partial = partial_path(out)
    marker = os.path.join(partial, PARTIAL_MARKER)
    if os.path.lexists(partial) and not (resume and os.path.isfile(marker)):
        shutil.rmtree(partial)  # ours, from an interrupted run (check_output verified the marker)
    os.makedirs(partial, exist_ok=True)
    open(marker, "w").close()
    try:
        yield partial
    except BaseException:
        if not keep_on_failure:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    os.remove(marker)
    swap_in(partial, out)


def swap_in(new: str, out: str) -> None:
    """Rename the finished folder `new` to `out`; an existing `out` is moved aside first and
    deleted only after the rename succeeded."""
    old = None
    if os.path.isdir(out):
        if not os.listdir(out):
            os.rmdir(out)
        else:
            old = os.path.normpath(out) + f".replaced-{os.getpid()}"
            os.rename(out, old)
    os.rename(new, out)
    if old:
        shutil.rmtree(old)
