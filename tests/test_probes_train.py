"""The trainer against settings and workdirs that cannot work (issue 36): a read-only workdir,
periods of 0, more sampler steps than the schedule has, a resolution the models cannot
divide, U-Net widths GroupNorm or the heads cannot split, a stale lock of a pid that lives
again, a lock that is a folder. Each is one line naming what to fix, exit 2, before JAX
starts (the lock's own rules are tested on `WorkdirLock`)."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from train_helpers import ROOT, cmd, env, tiny_config, tmpfs, wait_for

from smartbrush_jax.config import ConfigError, validate
from smartbrush_jax.settings import TRAIN_TIMESTEPS, TrainConfig
from smartbrush_jax.train import workdir_lock
from smartbrush_jax.train.workdir_lock import (
    NAME,
    WorkdirBusy,
    WorkdirLock,
    WorkdirUnusable,
    boot_id,
    process_start,
    read_holder,
)

DEMO = os.path.join(ROOT, "configs", "cpu_demo.py")


def refused(argv, says, timeout=240, before_jax=True):
    """Runs the trainer; asserts exit 2, no traceback, and one line `error: ...` holding each
    of `says` (the only line said when refused `before_jax`; else the last, after the log)."""
    proc = subprocess.run(argv, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and (len(lines) == 1 or not before_jax), proc.stderr[-3000:]
    for s in says:
        assert s in lines[-1], lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------ 1. read-only workdir
@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (tests run as root, whom chmod does not stop; skipped, with why,
    where mounting is not allowed)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs") as mount:
        yield mount


@pytest.mark.timeout(300)
def test_read_only_workdir_is_one_line_exit_2(read_only_dir, tmp_path):
    """Row: `--workdir` on a read-only folder was an OSError traceback creating train.lock
    (exit 1). Now one line saying the workdir is not writable, exit 2, before JAX starts;
    also for a workdir under /proc or under a file, and for `WorkdirLock` itself."""
    refused(cmd(str(read_only_dir)), [f"--workdir {read_only_dir} is not writable", "Read-only file system"])
    under_file = tmp_path / "a_file"
    under_file.write_text("x")
    refused(cmd(str(under_file / "run")), [f"--workdir {under_file / 'run'} lies under {under_file}, which is a file"])
    refused(cmd("/proc/smartbrush-probe-run"), ["--workdir /proc/smartbrush-probe-run is not writable"])
    with pytest.raises(WorkdirUnusable, match="is not writable"):
        WorkdirLock(str(read_only_dir)).acquire()


# ------------------------------------------------------------------------------ 2. periods of 0
# the periods whose 0 has a documented meaning (settings.TrainConfig's comments); any other is >= 1
ZERO_MEANS = {"sample_every": "no held-out grids", "keep_every": "keep only the last ones"}


@pytest.mark.timeout(60)
def test_checkpoint_every_and_log_every_of_0_are_refused_by_validation():
    """Row: `--config.train.checkpoint_every=0` / `log_every=0` divided by zero mid-run.
    Every `*_every` setting is checked by validation: a negative one, and 0 where 0 means
    nothing, are a ConfigError naming the field; 0 keeps its meaning where it has one."""
    periods = [f.name for f in dataclasses.fields(TrainConfig) if f.name.endswith("_every")]
    assert {"log_every", "checkpoint_every", "sample_every", "keep_every"} <= set(periods)
    for name in periods:
        for value in (0, -1):
            c = tiny_config()
            setattr(c.train, name, value)
            if value == 0 and name in ZERO_MEANS:
                validate(c)
                continue
            with pytest.raises(ConfigError, match=f"config.train.{name}: must be >= {0 if name in ZERO_MEANS else 1}"):
                validate(c)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("override", ["--config.train.checkpoint_every=0", "--config.train.log_every=0"])
def test_checkpoint_every_0_and_log_every_0_are_one_line_exit_2(tmp_path, override):
    field = override.split("=")[0][2:]
    refused(cmd(str(tmp_path / "run"), override), [f"error: {field}: must be >= 1"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 3. sample_steps
@pytest.mark.timeout(300)
def test_sample_steps_over_num_train_timesteps_is_one_line_exit_2(tmp_path):
    """Row: `--config.train.sample_every=1 --config.train.sample_steps=5000` was a JAX
    traceback at the first held-out grid. Validation checks the steps against the noise
    schedule's num_train_timesteps (the weights' scheduler_config.json when it says)."""
    refused(cmd(str(tmp_path / "run"), "--config.train.sample_every=1", "--config.train.sample_steps=5000"),
            [f"config.train.sample_steps: must be in [1, {TRAIN_TIMESTEPS}]", "num_train_timesteps", "5000"])
    c = tiny_config()
    c.train.sample_steps = TRAIN_TIMESTEPS
    validate(c)
    c.train.sample_steps = 0
    with pytest.raises(ConfigError, match="config.train.sample_steps: must be in"):
        validate(c)
    weights = tmp_path / "sd"
    (weights / "scheduler").mkdir(parents=True)
    (weights / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 100}))
    c = tiny_config()
    c.model.init_from, c.model.autoencoder, c.data.resolution = str(weights), "vae", 64
    c.train.sample_steps = 100
    validate(c)
    c.train.sample_steps = 101
    with pytest.raises(ConfigError, match=r"config.train.sample_steps: must be in \[1, 100\]"):
        validate(c)


# ------------------------------------------------------------------------------ 4. resolution
@pytest.mark.timeout(300)
@pytest.mark.parametrize("value,says", [
    ("0", "config.data.resolution: must be a positive multiple of 2 (2**1 for the U-Net's 2 blocks), got 0"),
    ("15", "config.data.resolution: must be a positive multiple of 2"),
])
def test_resolution_0_or_not_a_multiple_of_the_downsampling_is_one_line_exit_2(tmp_path, value, says):
    """Row: `--config.data.resolution=0` failed in the data pipeline after start-up. The side
    must go through the autoencoder (8 for SD's VAE) and every U-Net downsampling."""
    refused(cmd(str(tmp_path / "run"), f"--config.data.resolution={value}"), [says])


@pytest.mark.timeout(60)
def test_resolution_is_checked_against_the_vae_and_the_unet():
    c = tiny_config()
    c.model.init_from, c.model.autoencoder = "/models/sd", "vae"
    c.model.unet.block_out_channels = (16, 16, 16, 16)
    c.model.unet.down_block_types = ("DownBlock2D",) * 4
    c.model.unet.up_block_types = ("UpBlock2D",) * 4
    for ok in (64, 512, 768):
        c.data.resolution = ok
        validate(c)
    for bad in (32, 520, -64):
        c.data.resolution = bad
        with pytest.raises(ConfigError, match=r"config.data.resolution: .*64 \(8 for the VAE x 2\*\*3"):
            validate(c)


@pytest.mark.timeout(60)
def test_resolution_is_checked_against_the_weights_own_vae_and_unet(tmp_path):
    """A run from a diffusers folder is checked against its own VAE and U-Net (the tests'
    tiny ones halve the image once and have 3 levels), not the config's model.unet."""
    for part, blocks in (("vae", [32, 64]), ("unet", [32, 64, 64])):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps({"block_out_channels": blocks}))
    c = tiny_config()
    c.model.init_from, c.model.autoencoder, c.data.resolution = str(tmp_path), "vae", 16
    validate(c)
    c.data.resolution = 12
    with pytest.raises(ConfigError, match=r"multiple of 8 \(2 for the VAE x 2\*\*2 for the U-Net's 3 blocks\)"):
        validate(c)


# ------------------------------------------------------------------------------ 5. U-Net widths
@pytest.mark.timeout(300)
def test_unet_block_out_channels_not_divisible_is_one_line_exit_2(tmp_path):
    """Row: `--config.model.unet.block_out_channels='(32, 64, 63)'` was a ValueError
    traceback where the model is built. GroupNorm's groups and the attention heads must
    divide every block's width: a ConfigError naming the field, before JAX starts."""
    refused([sys.executable, "-m", "smartbrush_jax.train", f"--config={DEMO}", f"--workdir={tmp_path / 'run'}",
             "--config.model.unet.block_out_channels=(32, 64, 63)"],
            ["config.model.unet.block_out_channels: 63 channels are not divisible by "
             "model.unet.norm_num_groups=16"])
    refused(cmd(str(tmp_path / "run"), "--config.model.unet.attention_head_dim=3"),
            ["config.model.unet.block_out_channels: 16 channels do not split into "
             "model.unet.attention_head_dim=3 attention heads"])
    refused(cmd(str(tmp_path / "run"), "--config.model.text.num_attention_heads=3"),
            ["config.model.text.hidden_size: 16 is not divisible by model.text.num_attention_heads=3"])
    refused(cmd(str(tmp_path / "run"), "--config.model.unet.block_out_channels=(16, 16, 16)"),
            ["config.model.unet.block_out_channels: 3 blocks, but 2 down_block_types"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 6. stale locks
def _lock(w, **fields):
    os.makedirs(w, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "old", "started": time.time() - 86400,
              "heartbeat": time.time(), **fields}
    with open(os.path.join(w, NAME), "w") as f:
        json.dump(record, f)


def _takes_over(w, capsys, why):
    lock = WorkdirLock(w)
    lock.acquire()
    try:
        assert read_holder(os.path.join(w, NAME))["token"] == lock.token
        assert why in capsys.readouterr().err
    finally:
        lock.release()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pid", ["own", 1])
def test_stale_lock_of_a_pid_alive_again_is_taken_over(tmp_path, capsys, pid):
    """Row: a train.lock from a previous container, whose trainer had a pid that is alive
    now (pid 1, or this trainer's own), a day-old heartbeat, refused the run for ever. A
    heartbeat older than STALE_S is taken over wherever the holder ran (an old lock without
    the holder's start time); a live pid whose start time or boot id differ from the lock's
    is another process: taken over at once."""
    pid = os.getpid() if pid == "own" else pid
    w = str(tmp_path / "w")
    _lock(w, pid=pid, heartbeat=time.time() - 86400)  # written before the start time was recorded
    _takes_over(w, capsys, "no heartbeat for 86400 s")
    if process_start(pid) is None:
        pytest.skip("no /proc/<pid>/stat here: the start time cannot be told")
    _lock(w, pid=pid, pid_start=process_start(pid) + 12345, boot_id=boot_id())  # a fresh heartbeat
    _takes_over(w, capsys, f"process {pid} now is another process")
    if boot_id() is not None:
        _lock(w, pid=pid, pid_start=process_start(pid), boot_id="another-boot")
        _takes_over(w, capsys, "this machine has restarted since")


HOLDER = """
import sys, time
from smartbrush_jax.train.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.timeout(300)
def test_a_lock_held_by_a_live_trainer_is_refused_and_says_how_to_take_it_over(tmp_path):
    """The holder is alive and is the process that wrote the lock (its start time agrees):
    refused, exit 2, and the line says how to take the lock over by hand. An old lock of a
    live process with a fresh heartbeat is still held."""
    w = str(tmp_path / "w")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, w], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        record = read_holder(os.path.join(w, NAME))
        assert record["pid"] == holder.pid and record["pid_start"] == process_start(holder.pid)
        hand = f"if no run is using it, delete {os.path.join(w, NAME)} by hand"
        with pytest.raises(WorkdirBusy, match=f"process {holder.pid} on .*{hand}"):
            WorkdirLock(w).acquire()
        line = refused(cmd(w), [f"--workdir {w} is in use by another training run", f"process {holder.pid}", hand],
                       before_jax=False)  # the lock is taken where the run starts, after JAX's processes
        assert line.endswith(hand)
        old = {k: v for k, v in record.items() if k not in ("pid_start", "boot_id")}
        with open(os.path.join(w, NAME), "w") as f:
            json.dump(old, f)
        with pytest.raises(WorkdirBusy):
            WorkdirLock(w).acquire()
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: not workdir_lock._alive(holder.pid), timeout=30, what="the holder to end")


# ------------------------------------------------------------------------------ 7. a folder as the lock
@pytest.mark.timeout(300)
def test_train_lock_that_is_a_folder_is_one_line_exit_2(tmp_path):
    """Row: a train.lock that is a folder was reported as "in use by process ? on ?". It
    says the lock is a folder, not a lock file, to be removed by hand."""
    w = tmp_path / "run"
    (w / NAME).mkdir(parents=True)
    refused(cmd(str(w)), [f"{w / NAME} is a folder, not a lock file", f"rm -r {w / NAME}"])
    with pytest.raises(WorkdirUnusable, match="is a folder, not a lock file"):
        WorkdirLock(str(w)).acquire()
    assert (w / NAME).is_dir()  # left alone


@pytest.mark.timeout(120)
def test_a_new_lock_file_never_exists_empty_or_half_written(tmp_path):
    """The lock file was created empty and then written: a rival reading it in between took
    the empty file for garbage (stale), removed it and took the lock too (two threads racing
    400 times: 1 to 6 double holders). Checked at every line the lock's code runs while
    taking the lock: whenever the file exists, it holds a whole record."""
    workdir = str(tmp_path / "w")
    path = os.path.join(workdir, NAME)
    seen = []

    def check(frame, event, arg):
        if os.path.exists(path):
            with open(path, "rb") as f:
                seen.append(f.read())
        return check

    def tracer(frame, event, arg):
        return check if frame.f_code.co_filename == workdir_lock.__file__ else None

    lock = WorkdirLock(workdir, heartbeat_s=3600)
    sys.settrace(tracer)
    try:
        lock.acquire()
    finally:
        sys.settrace(None)
        lock.release()
    assert seen, "the lock was never seen"
    partial = [raw for raw in seen if not raw or json.loads(raw).get("token") != lock.token]
    assert partial == []
    assert not [n for n in os.listdir(workdir) if n != NAME]  # nothing left beside it
