"""One training run per workdir: `workdir/train.lock` names the process that holds it.

Two trainers on one workdir resume from the same step and collide on the next save (both
fail, the work since the last save is lost), so the second is refused at start with who
holds the workdir, and how to take it over by hand. A lock does not outlive its process for
ever: it is taken over when its heartbeat (rewritten every `HEARTBEAT_S` while the run lives)
is older than `STALE_S`, wherever its holder ran, or at once when its holder was on this host
and is no longer running. A pid alone does not say that: in a new container, or after a
reboot, the same pid is another process (often pid 1, or this very trainer), so the lock
records the holder's start time (`/proc/<pid>/stat`) and the machine's boot id, and a live
pid whose start time or boot id differ is another process: the lock is taken over at once.
A lock written without them (by an older version) is held while its pid lives and its
heartbeat is fresh. On a local disk the lock file is created with O_EXCL; an object store
(gs://) has no such call, so the taker writes its token, waits, and reads it back: of two
that raced, the one whose token is there holds the lock. Only process 0 of a multi-process
run locks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
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


class WorkdirUnusable(InputError):
    """The workdir cannot hold a run: not writable, a file, or its lock a folder."""


def check_workdir(workdir: str) -> None:
    """WorkdirUnusable unless the trainer can write the local `workdir` (existing or not) and
    its `train.lock` is not a folder: said before JAX starts instead of as an OSError from
    the first file the run writes. A gs:// workdir is checked by its first write."""
    if storage.is_remote(workdir):
        return
    path = os.path.abspath(workdir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirUnusable(f"--workdir {workdir} is a file, not a folder: give a folder for the run")
    _check_lock_path(workdir, os.path.join(workdir, NAME))
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirUnusable(f"--workdir {workdir} lies under {parent}, which is a file, not a folder")
    try:  # a probe file: permissions, a read-only mount, /proc, root or not
        fd, probe = tempfile.mkstemp(prefix=".smartbrush-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise _not_writable(workdir, parent, e) from None


def _not_writable(workdir: str, where: str, e: OSError) -> WorkdirUnusable:
    return WorkdirUnusable(f"--workdir {workdir} is not writable (cannot write in {where}: {e.strerror or e}): "
                           "give a folder this user can write")


def _check_lock_path(workdir: str, path: str) -> None:
    if not storage.is_remote(path) and os.path.isdir(path):
        raise WorkdirUnusable(f"{path} is a folder, not a lock file: no training run made it; if none uses "
                              f"--workdir {workdir}, remove the folder by hand (rm -r {path}) and run again")


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
        _check_lock_path(self.workdir, self.path)
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
                "started": self.started, "heartbeat": time.time(),
                "pid_start": process_start(os.getpid()), "boot_id": boot_id()}

    def _write_new(self) -> None:
        data = json.dumps(self._record()).encode()
        if storage.is_remote(self.path):
            storage.write_bytes(self.path, data)
            time.sleep(SETTLE_S)  # a racing taker's write lands in this window; the last one wins
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.token:
                raise WorkdirBusy(_busy_message(self.workdir, holder or {}))
            return
        try:
            storage.makedirs(self.workdir)
            _create_whole(self.path, data, self.token)
        except FileExistsError:  # another taker got there first (or a folder was made since)
            _check_lock_path(self.workdir, self.path)
            raise WorkdirBusy(_busy_message(self.workdir, read_holder(self.path) or {})) from None
        except OSError as e:  # a read-only mount, a folder of another user
            raise _not_writable(self.workdir, self.workdir, e) from None

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
        beat = holder.get("heartbeat")
        age = time.time() - float(beat) if isinstance(beat, (int, float)) else float("inf")
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
            if not _alive(pid):
                return f"process {pid} is no longer running"
            boot, now_boot = holder.get("boot_id"), boot_id()
            if boot and now_boot and boot != now_boot:
                return f"this machine has restarted since (process {pid} now is another process)"
            started, now_started = holder.get("pid_start"), process_start(pid)
            if started is not None and now_started is not None and started != now_started:
                return f"process {pid} now is another process (started after the lock was written)"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None


def _create_whole(path: str, data: bytes, token: str) -> None:
    """Create the local file `path` holding `data`, or FileExistsError: it never exists
    empty or half-written. The record is written beside it and hard-linked into place (a
    link fails when the name exists, as O_EXCL does). Created empty and then written, a
    rival reading it in between took the empty file for garbage, removed it and took the
    lock too: 6 double holders in 400 races of two threads. Where the disk has no hard
    links (gcsfuse), O_EXCL and a write, with that window."""
    tmp = os.path.join(os.path.dirname(path), f".{NAME}.{token}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat`'s field 22),
    or None where there is no /proc: with the boot id, what tells the holder from another
    process that got its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields from 3 on, after the command's ")"
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> Optional[str]:
    """This machine's boot id (a new one at each boot), or None where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


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
            f"wait for it to end or stop it; the lock is taken over by itself once that process has ended, or after "
            f"{STALE_S / 60:.0f} minutes without a heartbeat; if no run is using it, delete "
            f"{storage.join(workdir, NAME)} by hand")
