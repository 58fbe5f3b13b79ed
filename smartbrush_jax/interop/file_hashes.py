"""The sha256 of every file an export writes, kept in its `smartbrush.json` and checked by
whoever loads the folder, so a weights file whose bytes changed after export (a bad disk, a
copy cut short and resumed, a tool that rewrote it) is refused naming the file instead of
sampling garbage.

    "checksums": {"unet/diffusion_pytorch_model.safetensors": "sha256:<64 hex digits>", ...}

Paths are relative to the folder, with "/". Every file but `smartbrush.json` itself is
listed. A folder without them (any stock diffusers folder, an export written before them)
loads as before. Standard library only: the PyTorch pipeline checks them without JAX.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, Optional, Type

SETTINGS_FILE = "smartbrush.json"
KEY = "checksums"
ALGORITHM = "sha256"
ALWAYS_READ = ("scheduler",)  # subfolders every loader reads, whatever components it asks for


def file_digest(path: str) -> str:
    """"sha256:<hex>" of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return f"{ALGORITHM}:{h.hexdigest()}"


def folder_checksums(folder: str, skip: Iterable[str] = ()) -> Dict[str, str]:
    """The digest of every file under `folder` but its smartbrush.json and the relative
    paths in `skip` (a writer's in-progress marker), by relative path."""
    skip = {SETTINGS_FILE, *skip}
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in skip:
                out[rel] = file_digest(os.path.join(root, name))
    return out


def recorded(folder: str, error: Type[Exception]) -> Optional[Dict[str, str]]:
    """The checksums `folder`'s smartbrush.json records; None where it has none."""
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({e})") from None
    sums = settings.get(KEY) if isinstance(settings, dict) else None
    if sums is None:
        return None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise error(f"{path}: {KEY!r} must map file paths to \"{ALGORITHM}:<hex>\" strings")
    return sums


def verify_export(folder: str, parts: Optional[Iterable[str]] = None, error: Type[Exception] = ValueError) -> None:
    """`error` naming the first file whose bytes are not those the folder's smartbrush.json
    recorded, or that is missing; nothing where it records none. `parts`: only the files of
    these subfolders (and the folder's own files, and the scheduler's) are read; None: all."""
    sums = recorded(folder, error)
    if not sums:
        return
    wanted = None if parts is None else set(parts) | set(ALWAYS_READ)
    for rel, want in sorted(sums.items()):
        pieces = rel.split("/")
        if rel.startswith("/") or ".." in pieces or "" in pieces:
            raise error(f"{os.path.join(folder, SETTINGS_FILE)}: checksum for {rel!r}, which is not a path "
                        "inside the export")
        if wanted is not None and len(pieces) > 1 and pieces[0] not in wanted:
            continue
        path = os.path.join(folder, *pieces)
        shown = f"{folder.rstrip('/')}/{rel}"
        if not os.path.isfile(path):
            raise error(f"{shown}: missing, but {SETTINGS_FILE} records its checksum: the export is incomplete "
                        "(copy it again)")
        if not want.startswith(f"{ALGORITHM}:"):
            raise error(f"{shown}: {SETTINGS_FILE} records {want[:20]!r}, not a {ALGORITHM} checksum")
        got = file_digest(path)
        if got != want:
            raise error(f"{shown}: {ALGORITHM} {got[len(ALGORITHM) + 1:][:16]}... does not match the "
                        f"{want[len(ALGORITHM) + 1:][:16]}... {SETTINGS_FILE} recorded when it was exported: the "
                        "file changed since (a damaged disk or copy?); copy or export it again")
