"""The trainer against a careless user (issue 24's rows): two trainers on one workdir, config
overrides that name no field or cannot be parsed, a disk that fills while saving."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from train_helpers import ROOT, cmd, copy_run, env, read, start, steps_on_disk, tmpfs, wait_for

from smartbrush_jax.train import workdir_lock
from smartbrush_jax.train.workdir_lock import NAME, WorkdirBusy, WorkdirLock, read_holder


def test_two_train_commands_on_one_workdir_the_second_is_refused(tmp_path, tiny_run):
    """Row: two `train` commands on one workdir, started seconds apart, both resumed from
    the same step and collided on the next save. The second is refused at start (exit 2,
    one line naming who holds it) and the first goes on; once the first is killed (SIGKILL:
    no clean-up), its lock is taken over by the next run."""
    w = copy_run(tiny_run, tmp_path / "run")
    log = str(tmp_path / "first.log")
    with start(w, "--config.train.steps=1000", "--config.train.checkpoint_every=1000", log=log) as first:
        wait_for(lambda: "resumed from step" in read(log) or first.poll() is not None, what="the first run")
        second = subprocess.run(cmd(w, "--config.train.steps=6"), env=env(), cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --workdir {w} is in use by another training run")
        assert f"process {first.pid} on {socket.gethostname()}" in last
        assert first.poll() is None  # the first one is untouched
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert read_holder(os.path.join(w, NAME))["pid"] == first.pid  # SIGKILL left it behind
    third = subprocess.run(cmd(w, "--config.train.steps=6"), env=env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of process {first.pid}" in third.stderr and "is no longer running" in third.stderr
    assert steps_on_disk(w) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(w, NAME))  # released at the end


def test_the_lock_is_released_only_by_its_holder_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
    w = str(tmp_path / "w")
    a = WorkdirLock(w).__enter__()
    with pytest.raises(WorkdirBusy, match="in use by another training run"):
        WorkdirLock(w).acquire()
    a.release()
    assert not os.path.exists(os.path.join(w, NAME))

    # a holder on another host: alive while its heartbeat is fresh, stale after STALE_S
    lock_file = os.path.join(w, NAME)
    other = {"host": "elsewhere", "pid": 1, "token": "t", "started": time.time(), "heartbeat": time.time()}
    json.dump(other, open(lock_file, "w"))
    with pytest.raises(WorkdirBusy, match="process 1 on elsewhere"):
        WorkdirLock(w).acquire()
    json.dump({**other, "heartbeat": time.time() - workdir_lock.STALE_S - 1}, open(lock_file, "w"))
    b = WorkdirLock(w)
    b.acquire()
    assert read_holder(lock_file)["token"] == b.token

    # one that took over from us is not removed by our release
    json.dump({**other, "token": "newer", "heartbeat": time.time()}, open(lock_file, "w"))
    b.release()
    assert read_holder(lock_file)["token"] == "newer"
    os.remove(lock_file)

    # garbage in the lock file never locks a workdir for ever
    open(lock_file, "w").write("not json")
    c = WorkdirLock(w)
    c.acquire()
    c.release()


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path):
    w = str(tmp_path / "w")
    lock = WorkdirLock(w, heartbeat_s=0.05)
    lock.acquire()
    first = read_holder(os.path.join(w, NAME))["heartbeat"]
    wait_for(lambda: read_holder(os.path.join(w, NAME))["heartbeat"] > first, timeout=30, what="a heartbeat")
    lock.release()


@pytest.mark.parametrize("override,says", [
    ("--config.optim.lr=abc", "--config.optim.lr=abc: could not convert string to float"),
    ("--config.train.bogus=1", "--config.train.bogus: config.train has no field 'bogus' (it has: batch_size,"),
    ("--config.bogus.x=1", "config has no field 'bogus' (it has: data, loss, mesh, model, optim, train)"),
    ("--config.train.steps=1.5", "--config.train.steps=1.5: invalid literal for int()"),
    ("--config.train.steps.x=1", "config.train.steps is a value, not a section"),
    ("--no_such_flag=1", "Unknown command line flag 'no_such_flag'"),
    ("--config.model.attention_impl=xla", "config.model.attention_impl was renamed: use config.model.attention"),
])
def test_train_config_lr_abc_and_train_bogus_are_one_line_exit_2(tmp_path, override, says):
    """Row: `train --config.optim.lr=abc` gave absl's usage text and exit 1,
    `--config.train.bogus=1` an `AttributeError` traceback. Each is now one line naming the
    field (and the fields there are, or the type it wanted), exit 2, nothing created."""
    w = tmp_path / "run"
    proc = subprocess.run(cmd(str(w), override), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr[-3000:]
    assert not w.exists()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (root only: skipped, and said why, where mounting is not allowed)."""
    with tmpfs(tmp_path / "disk", "size=8m", "a small tmpfs") as mount:
        yield mount


def test_train_on_a_disk_that_fills_mid_save_says_so_in_one_line(small_disk, tiny_run):
    """Row: train on a disk that fills mid-save: exit 1 with a `ValueError: RESOURCE_EXHAUSTED`
    traceback (and hundreds of logged ones). Now one line, "disk full while saving step N;
    the last good checkpoint is M", no traceback; given space, the same command resumes
    from M."""
    w = copy_run(tiny_run, small_disk / "run", data_only=True)  # 1 MB of data; each step saves 3 MB
    proc = subprocess.run(cmd(w, "--config.train.steps=10"), env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "No space left" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    found = re.match(r"error: disk full while saving step (\d+) in .*; the last good checkpoint is (\d+): free", last)
    assert found, last
    failed, good = int(found.group(1)), int(found.group(2))
    assert failed == good + 2 and str(good) in steps_on_disk(w)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = subprocess.run(cmd(w, f"--config.train.steps={failed}"), env=env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {good}" in again.stderr
    assert str(failed) in steps_on_disk(w) and not [d for d in steps_on_disk(w) if "tmp" in d]


AFTER_CLOSE = """
import asyncio, sys, tensorstore as ts
from smartbrush_jax import checkpoints
if sys.argv[1] == "quiet":
    checkpoints._quiet_aborted_writes()
    checkpoints._quiet_aborted_writes()  # a second manager in one process adds nothing
promise, future = ts.Promise.new()
loop = asyncio.new_event_loop()
async def waiter():
    await future
task = loop.create_task(waiter())
loop.run_until_complete(asyncio.sleep(0.05))
loop.close()
promise.set_result(1)  # the write finishes after its loop closed, as an aborted save's do
class Broken:
    def __del__(self):
        raise ValueError("some other unraisable error")
Broken()
print("went on")
"""


@pytest.mark.parametrize("mode", ["default", "quiet"])
def test_a_write_finishing_after_its_loop_closed_prints_no_traceback(mode):
    """What the disk-full row saw in CI: TensorStore writes of the aborted save finish after
    Orbax's event loop closed, and each reports "Event loop is closed" through
    sys.unraisablehook. Opening a checkpoint manager quiets exactly those; another
    unraisable error still prints."""
    proc = subprocess.run([sys.executable, "-c", AFTER_CLOSE, mode], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "went on" in proc.stdout, proc.stderr[-3000:]
    assert "some other unraisable error" in proc.stderr
    assert ("Event loop is closed" in proc.stderr) == (mode == "default"), proc.stderr[-3000:]
