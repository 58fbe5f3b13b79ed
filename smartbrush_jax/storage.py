"""Paths that are local folders or `gs://` URLs, read and written the same way.

Everything a run or a tool writes or reads by path goes through here (or through Orbax,
which takes the same strings): a local path is made absolute, a URL is kept. `etils.epath`
does the I/O; for `gs://` it goes through gcsfs, which follows the emulator settings
(`STORAGE_EMULATOR_HOST`) where TensorFlow's client would not, so `EPATH_USE_TF` is
false unless the user set it. Readers that only take local files (a tokenizer folder,
diffusers' `from_pretrained`, ArrayRecord shards) get a local copy of a remote path
(`local_copy`); writers that only write local files build the output locally and
`upload` it. Errors name the path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

from smartbrush_jax.errors import InputError  # noqa: E402


class StorageError(InputError):
    """A path that cannot be read or written; the message names it."""


def is_remote(path) -> bool:
    return "://" in str(path)


def absolute(path) -> str:
    """A local path made absolute; a URL as it is."""
    return str(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def join(base, *parts) -> str:
    return str(epath.Path(absolute(base)).joinpath(*parts))


def P(path) -> epath.Path:  # noqa: N802  (a constructor)
    return epath.Path(absolute(path))


def exists(path) -> bool:
    return P(path).exists()


def isdir(path) -> bool:
    return P(path).is_dir()


def isfile(path) -> bool:
    p = P(path)
    return p.exists() and not p.is_dir()


def makedirs(path) -> None:
    try:
        P(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{path}: cannot create the folder ({e})") from None


def read_text(path) -> str:
    try:
        return P(path).read_text()
    except OSError as e:
        raise StorageError(f"{path}: cannot read it ({e})") from None


def read_bytes(path) -> bytes:
    try:
        return P(path).read_bytes()
    except OSError as e:
        raise StorageError(f"{path}: cannot read it ({e})") from None


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path, data: bytes) -> None:
    """Written whole: a local file beside its target and renamed (an object store writes
    an object at once)."""
    target = P(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(path):
            target.write_bytes(data)
            return
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as e:
        raise StorageError(f"{path}: cannot write it ({e})") from None


def rename(src, dst) -> None:
    """A folder or file moved (on an object store: copied and deleted, not atomic)."""
    P(src).rename(P(dst))


MARKERS = ("metadata.json", "model_index.json", "smartbrush.json", "run.json", "model.json")


def upload(local: str, remote: str) -> None:
    """A local file or folder copied to `remote` (a URL or a local path); the marker files
    (MARKERS) after everything else, so a reader that looks for them sees a whole folder."""
    dst = P(remote)
    if os.path.isfile(local):
        dst.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(local).copy(dst, overwrite=True)
        return
    pending = []
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        folder = dst if rel == "." else dst / rel
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(files):
            if f in MARKERS:
                pending.append((epath.Path(root, f), folder / f))
            else:
                epath.Path(root, f).copy(folder / f, overwrite=True)
    for src, target in pending:
        src.copy(target, overwrite=True)


def local_copy(path, cache: str | None = None) -> str:
    """A local path with the content of `path`: the path itself when local; a remote file or
    folder downloaded into a cache folder (one per URL, refreshed each call)."""
    if not is_remote(path):
        return absolute(path)
    src = P(path)
    if not src.exists():
        raise StorageError(f"{path}: no such file or folder")
    root = cache or os.path.join(tempfile.gettempdir(), "smartbrush_remote")
    dst = os.path.join(root, hashlib.sha1(str(path).encode()).hexdigest()[:16], src.name)
    if os.path.exists(dst):
        shutil.rmtree(dst) if os.path.isdir(dst) else os.remove(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not src.is_dir():
        src.copy(epath.Path(dst))
        return dst
    _download(src, dst)
    return dst


def _download(src: epath.Path, dst: str) -> None:
    """A remote folder copied file by file (epath refuses `**` globs on GCS)."""
    os.makedirs(dst, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _download(item, os.path.join(dst, item.name))
        else:
            item.copy(epath.Path(dst, item.name))


GCSFUSE = "fuse.gcsfuse"
MOUNTS = "/proc/mounts"


def mount_type(path, mounts_file: str | None = None) -> str:
    """The file system type of the mount that holds `path` (the longest mount point that is
    a prefix of its real path), from the mount table; "" when unknown or remote."""
    if is_remote(path):
        return ""
    real = os.path.realpath(absolute(path))
    best, kind = "", ""
    try:
        with open(mounts_file or MOUNTS) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind
