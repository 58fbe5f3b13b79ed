"""One training run per workdir: `workdir/train.lock` names the process that holds it.

Two trainers on one workdir resume from the same step and collide on the next save (both
fail, the work since the last save is lost), so the second is refused at start with who
holds the workdir. A lock does not outlive its process for ever: it is taken over when its
holder is on this host and no longer running, or when its heartbeat (rewritten every
`HEARTBEAT_S` while the run lives) is older than `STALE_S` (a holder on another host that
died). On a local disk the lock file is created with O_EXCL; an object store (gs://) has
no such call, so the taker writes its token, waits, and reads it back: of two that raced,
the one whose token is there holds the lock. Only process 0 of a multi-process run locks.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from smartbrush_jax import storage
from smartbrush_jax.errors import InputError
from smartbrush_jax.storage import StorageError

NAME = "train.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # a heartbeat this old: its holder is gone (10 heartbeats missed)
SETTLE_S = 2.0  # gs://: the wait between writing a token and reading it back


class WorkdirBusy(InputError):
    """Another training run holds the workdir; the message says which and since when."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` the workdir is this process's until the block ends."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.workdir, self.path = workdir, storage.join(workdir, NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- holding it
    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        holder = read_holder(self.path)
        if holder is not None:
            why = self._stale(holder)
            if why is None:
                raise WorkdirBusy(_busy_message(self.workdir, holder))
            print(f"warning: {self.path}: taking over the lock of {_who(holder)} ({why})", file=sys.stderr)
            self._remove_if(holder.get("token"))
        self._write_new()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (a run that took it over keeps its own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._remove_if(self.token)

    # ---------------------------------------------------------------- the file
    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": self.started, "heartbeat": time.time()}

    def _write_new(self) -> None:
        data = json.dumps(self._record()).encode()
        if storage.is_remote(self.path):
            storage.write_bytes(self.path, data)
            time.sleep(SETTLE_S)  # a racing taker's write lands in this window; the last one wins
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.token:
                raise WorkdirBusy(_busy_message(self.workdir, holder or {}))
            return
        storage.makedirs(self.workdir)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another taker got there first
            raise WorkdirBusy(_busy_message(self.workdir, read_holder(self.path) or {})) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.token:
                return  # taken over (we were thought dead): leave it to the new holder
            try:
                storage.write_text(self.path, json.dumps(self._record()))
            except (OSError, StorageError):
                pass  # a missed beat; the next one tries again

    def _remove_if(self, token: Optional[str]) -> None:
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == token:
            try:
                storage.P(self.path).unlink()
            except OSError:
                pass

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the holder is gone, or None while it may be alive."""
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"]):
                return f"process {holder['pid']} is no longer running"
            return None
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None


def read_holder(path: str) -> Optional[dict]:
    """The lock's record, or None when there is none; a file that is not one reads as a
    holder without a heartbeat (stale), so garbage never locks a workdir for ever."""
    if not storage.isfile(path):
        return None
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, StorageError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _who(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _busy_message(workdir: str, holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    beat = holder.get("heartbeat")
    alive = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return (f"--workdir {workdir} is in use by another training run ({_who(holder)}, started {since}{alive}): "
            f"wait for it to end or stop it; the lock ({NAME}) is taken over by itself once that process has ended "
            f"(after {STALE_S / 60:.0f} minutes without a heartbeat when it ran on another host)")
