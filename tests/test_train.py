"""The trainer end to end on a micro config: exact resume after SIGKILL, SIGTERM saves and
exits 0, non-finite steps skipped / stopping, 1 vs 8 devices (data parallel and FSDP), and
config validation. Several processes: tests/test_launch.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from smartbrush_jax.config import ConfigError, base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_train.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The micro config's synthetic data, built once and copied into each workdir."""
    work = tmp_path_factory.mktemp("train_data")
    proc = _train(str(work), "--config.train.steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(work / "data")


def _cmd(workdir, *overrides, extra=()):
    return [sys.executable, "-m", "smartbrush_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
            *overrides, *extra]


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train(workdir, *overrides, devices=1, timeout=600):
    return subprocess.run(_cmd(workdir, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=_env(devices), cwd=ROOT)


def _workdir(tmp_path, data_dir, name):
    w = tmp_path / name
    shutil.copytree(data_dir, w / "data")
    return str(w)


def _params(workdir, step=None, item="params"):
    from smartbrush_jax.checkpoints import restore_params

    s, p = restore_params(workdir, step, ema=item == "ema")
    return s, _flat(p)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _summary(workdir, name="summary.json"):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def _losses(summary):
    return [h["loss"] for h in summary["history"] if "loss" in h]


def test_resume_after_sigkill_is_exact(tmp_path, data_dir):
    steps = ["--config.train.steps=40", "--config.train.checkpoint_every=5", "--config.train.log_every=1"]
    straight = _workdir(tmp_path, data_dir, "straight")
    proc = _train(straight, *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(_summary(straight))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # the loss falls
    # FLOP accounting: model TFLOP/s in every log entry (no MFU: a CPU has no peak in the
    # table); XLA's count of the step is near the analytic 3x U-Net forward (it adds the
    # text encoder, AdamW, EMA and elementwise work, and skips padded conv taps)
    history = [h for h in _summary(straight)["history"] if "loss" in h]
    assert len(history) == 40 and all(h["tflops_per_s"] > 0 and "mfu" not in h for h in history)
    assert 0.9 < _summary(straight)["flops"]["xla_over_model"] < 1.3

    killed = _workdir(tmp_path, data_dir, "killed")
    p = subprocess.Popen(_cmd(killed, *steps), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    rng = np.random.default_rng()
    target = int(rng.integers(1, 4)) * 5  # kill after checkpoint 5, 10 or 15 has landed
    while not os.path.isdir(os.path.join(killed, "checkpoints", str(target))) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 0.3)))
    p.send_signal(signal.SIGKILL)
    p.wait()
    proc = _train(killed, *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    s1, a = _params(straight)
    s2, b = _params(killed)
    assert s1 == s2 == 40
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the same examples were seen: the losses of the last logged steps agree
    assert _losses(_summary(killed))[-5:] == losses[-5:]


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, data_dir):
    w = _workdir(tmp_path, data_dir, "term")
    p = subprocess.Popen(_cmd(w, "--config.train.steps=100000", "--config.train.checkpoint_every=1000"),
                         env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isfile(os.path.join(w, "model.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)  # let it take some steps
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM: checkpoint at step" in err
    step = int(err.split("SIGTERM: checkpoint at step ")[1].split(" ")[0].rstrip(";"))
    assert os.path.isdir(os.path.join(w, "checkpoints", str(step)))
    proc = _train(w, f"--config.train.steps={step + 2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step}" in proc.stderr


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data_dir):
    w = _workdir(tmp_path, data_dir, "nan_once")
    proc = _train(w, "--config.train.debug_nan_steps=(3,)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(w)["nonfinite_total"] == 1

    w = _workdir(tmp_path, data_dir, "nan_many")
    proc = _train(w, "--config.train.debug_nan_steps=(4,5,6)", "--config.train.log_every=1")
    assert proc.returncode == 1
    assert "3 non-finite steps in a row" in proc.stderr and "last good checkpoint is step 4" in proc.stderr
    step, params = _params(w)
    assert step == 4 and all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize("mesh", [("data", ["--config.mesh.shape.data=8"]),
                                  ("fsdp", ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8",
                                            "--config.mesh.fsdp=True"])], ids=lambda m: m[0])
def test_eight_devices_match_one(tmp_path, data_dir, mesh):
    one = _workdir(tmp_path, data_dir, "one")
    proc = _train(one, "--config.train.log_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = _workdir(tmp_path, data_dir, "eight")
    proc = _train(eight, "--config.train.log_every=1", *mesh[1], devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(_losses(_summary(eight)), _losses(_summary(one)), rtol=1e-5)
    _, a = _params(one)
    _, b = _params(eight)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * max(1.0, np.abs(a[k]).max()), err_msg=k)


def test_bad_config_values_are_refused():
    c = base_config()
    c.data.synthetic_scenes = 10
    c.model.autoencoder = "identity"
    validate(c, num_devices=8)
    for field, value, message in [
        ("train.batch_size", 12, "not divisible by the data-parallel size 8"),
        ("model.num_levels", 0, "must be >= 1"),
        ("model.dtype", "float16", "must be one of"),
        ("loss.eps_region", "box", "must be 'all' or 'mask'"),
        ("optim.lr", -1.0, "must be > 0"),
        ("train.peak_tflops", -1.0, "must be >= 0"),
    ]:
        bad = base_config()
        bad.data.synthetic_scenes = 10
        bad.model.autoencoder = "identity"
        section, name = field.split(".")
        setattr(getattr(bad, section), name, value)
        with pytest.raises(ConfigError, match=f"config.{field}: .*{message}"):
            validate(bad, num_devices=8)
    vae = base_config()
    vae.data.synthetic_scenes = 10
    with pytest.raises(ConfigError, match="'vae' needs model.init_from"):
        validate(vae)
    mesh = base_config()
    mesh.data.synthetic_scenes = 10
    mesh.model.autoencoder = "identity"
    mesh.mesh.shape = {"data": 3, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="needs 3 devices, there are 8"):
        validate(mesh, num_devices=8)


def test_unknown_config_field_is_a_clear_error(tmp_path):
    proc = _train(str(tmp_path / "w"), "--config.train.stepz=3", timeout=120)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_demo_inpaint_without_a_trained_run_is_a_clear_error(tmp_path, capsys):
    from smartbrush_jax.demo import main

    assert main(["--workdir", str(tmp_path)]) == 2
    assert "train the demo first" in capsys.readouterr().err
