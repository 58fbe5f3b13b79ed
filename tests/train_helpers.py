"""Running the trainer on the micro config (tests/configs/tiny_train.py) as a user does, and
reading what it left: shared by test_train.py, test_faults.py and the family runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_train.py")


def tiny_config():
    """The micro config as a ConfigDict (what `--config=tests/configs/tiny_train.py` gives)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_train", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def cmd(workdir, *overrides):
    return [sys.executable, "-m", "smartbrush_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", *overrides]


def env(devices=1):
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def train(workdir, *overrides, devices=1, timeout=600):
    return subprocess.run(cmd(workdir, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=env(devices), cwd=ROOT)


@contextlib.contextmanager
def start(workdir, *overrides, log=None, devices=1, extra_args=(), extra_env=None):
    """A trainer in its own process group (a new session, as a scheduler starts a job), its
    stderr to `log`; `os.killpg(p.pid, sig)` signals it and any worker it started. Whatever
    is left of the group when the block ends is killed."""
    with open(log or os.path.join(str(workdir) + ".log"), "w") as err:
        p = subprocess.Popen([*cmd(workdir, *overrides), *extra_args], env={**env(devices), **(extra_env or {})},
                             cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            yield p
        finally:
            kill_group(p.pid)
            p.wait()


@contextlib.contextmanager
def tmpfs(mount, options, what):
    """A tmpfs mounted at the new folder `mount` with `options` for the block (root only:
    the test is skipped, saying why, where mounting is not allowed)."""
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount {what} here ({proc.stderr.strip()[:200]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout=300, what="the condition"):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read(path):
    with open(path) as f:
        return f.read()


def copy_run(src, dst, data_only=False):
    """A copy of a workdir (or of its prepared data only) to train on without touching the original."""
    if data_only:
        shutil.copytree(os.path.join(src, "data"), os.path.join(dst, "data"))
    else:
        shutil.copytree(src, dst)
    return str(dst)


def state(workdir, step=None, item=None):
    """(step, {"params/...", "ema/...", "opt_state/...": array}) of a checkpoint, on the host;
    `item` keeps one top-level entry ("params", "ema", "opt_state")."""
    from smartbrush_jax.checkpoints import restore_state

    s, tree = restore_state(workdir, step)
    if item is not None:
        tree = {item: tree[item]}
    return s, flat(tree)


def flat(tree):
    """{"params/down_blocks_0/...": array, ...} of any tree (dicts, TrainState, optax states)."""
    import jax

    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return {"/".join(name(k) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def run_tiny(workdir, corrupt_grads=None, **overrides):
    """The trainer in this process on the micro config, `section__field=value` overridden
    (`train__steps=5`); returns its summary."""
    from smartbrush_jax.train.loop import run

    config = tiny_config()
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(config[section], field, value)
    return run(config, str(workdir), corrupt_grads=corrupt_grads)


def assert_trees_equal(a, b, keys=None):
    """Bit-identical leaves (every leaf of `a` whose path starts with one of `keys`)."""
    chosen = [k for k in a if keys is None or k.startswith(tuple(keys))]
    assert chosen and set(chosen) <= set(b), (sorted(a)[:5], sorted(b)[:5])
    for k in chosen:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def summary(workdir, name="summary.json"):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def losses(s):
    return [h["loss"] for h in s["history"] if "loss" in h]


def steps_on_disk(workdir):
    """The names under workdir/checkpoints (finished steps, and anything moved aside)."""
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def inpaint_keeps_the_background(export, tmp_path, seed, shape, box, args, resolution):
    """`inpaint --box` on a random image: pixels outside the box byte-identical, the box painted."""
    from PIL import Image

    from smartbrush_jax.cli.inpaint import main as inpaint

    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    assert inpaint(["--checkpoint", export, "--image", str(tmp_path / "in.png"), "--box", ",".join(map(str, box)),
                    *args, "--steps", "2", "--resolution", str(resolution), "--out", str(tmp_path / "out")]) == 0
    result = np.asarray(Image.open(tmp_path / "out" / "result.png"))
    inside = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    assert result.shape == image.shape and (result[~inside] == image[~inside]).all()
    assert (result[inside] != image[inside]).any()  # and the box was painted
