"""The trainer end to end on a micro config: exact resume after SIGKILL, SIGTERM saves and
exits 0, non-finite steps skipped / stopping, 1 vs 8 devices (data parallel and FSDP), and
config validation. Several processes: tests/test_launch.py."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from train_helpers import (
    ROOT,
    assert_trees_equal,
    cmd,
    copy_run,
    env,
    flat,
    losses,
    run_tiny,
    state,
    summary,
    tiny_config,
    train,
)

from smartbrush_jax.config import ConfigError, base_config, validate


@pytest.fixture
def data_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, tiny_run):
    """The micro config's 8 steps on one device, every step logged: the reference the
    8-device runs of each mesh are compared with (read only)."""
    one = _workdir(tmp_path_factory.mktemp("one_device"), tiny_run, "one")
    run_tiny(one, train__log_every=1)
    return one


def _workdir(tmp_path, tiny_run, name):
    return copy_run(tiny_run, tmp_path / name, data_only=True)


def _params(workdir, step=None):
    return state(workdir, step, item="params")


def test_resume_after_sigkill_is_exact(tmp_path, data_dir):
    steps = ["--config.train.steps=40", "--config.train.checkpoint_every=5", "--config.train.log_every=1"]
    straight = _workdir(tmp_path, data_dir, "straight")
    ref = run_tiny(straight, train__steps=40, train__checkpoint_every=5, train__log_every=1)
    ref_losses = losses(ref)
    assert np.mean(ref_losses[-4:]) < np.mean(ref_losses[:4])  # the loss falls
    # FLOP accounting: model TFLOP/s in every log entry (no MFU: a CPU has no peak in the
    # table); XLA's count of the step is near the analytic 3x U-Net forward (it adds the
    # text encoder, AdamW, EMA and elementwise work, and skips padded conv taps)
    history = [h for h in ref["history"] if "loss" in h]
    assert len(history) == 40 and all(h["tflops_per_s"] > 0 and "mfu" not in h for h in history)
    assert 0.9 < ref["flops"]["xla_over_model"] < 1.3
    assert summary(straight)["steps"] == 40  # run() wrote what it returned

    killed = _workdir(tmp_path, data_dir, "killed")  # SIGKILL needs a process of its own
    p = subprocess.Popen(cmd(killed, *steps), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    rng = np.random.default_rng(20261201)  # seeded: a failure names a kill point that can be replayed
    target = int(rng.integers(1, 4)) * 5  # kill after checkpoint 5, 10 or 15 has landed
    delay = float(rng.uniform(0, 0.3))
    while not os.path.isdir(os.path.join(killed, "checkpoints", str(target))) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    proc = train(killed, *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr, f"kill after checkpoint {target} + {delay:.2f} s"
    s1, a = state(straight)
    s2, b = state(killed)
    assert s1 == s2 == 40
    assert a.keys() == b.keys() and any(k.startswith("opt_state/") for k in a)
    # params, EMA (what export and inpainting use), Adam moments and counts, rng, counters
    assert_trees_equal(a, b)
    # the same examples were seen: the losses of the last logged steps agree
    assert losses(summary(killed))[-5:] == ref_losses[-5:]


def test_nonfinite_gradient_leaves_the_state_unchanged(tmp_path, data_dir, caplog):
    """inf planted in the gradients (the loss stays finite) at step index 3: the update is
    skipped, so the state the step returns equals checkpoint 3 bit for bit (params, Adam
    state, EMA); the run goes on, counts it, and skips the checkpoint of the bad step."""
    import logging

    import jax
    from flax.core import meta

    from smartbrush_jax.checkpoints import restore_state
    from smartbrush_jax.data.pipeline import make_dataset
    from smartbrush_jax.interop.loader import load_workdir
    from smartbrush_jax.train.loop import data_configs, data_sources
    from smartbrush_jax.train.step import (
        build_models,
        infinite_grads_at,
        init_state_fn,
        make_optimizer,
        make_train_step,
    )

    caplog.set_level(logging.INFO)
    w = _workdir(tmp_path, data_dir, "nan_once")
    summ = run_tiny(w, infinite_grads_at((3,)), train__checkpoint_every=1, train__log_every=1, train__steps=5)
    assert summ["nonfinite_total"] == 1
    assert "step 4: checkpoint skipped (1 non-finite steps in a row); the latest is step 3" in caplog.text
    # the compiled step's memory and collectives, logged at start-up as `aot` reports them
    assert "compiled step: memory per device:" in caplog.text and "compiled step: collectives" in caplog.text
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["1", "2", "3", "5"]

    # the step function itself, on checkpoint 3 and a batch of the run's data
    config = tiny_config()
    dirs, _, tokenizer = data_sources(config, w)
    models = build_models(config, len(tokenizer))
    train_cfg, _ = data_configs(config, dirs, dirs, tokenizer.name_or_path, models.latent_factor)
    tx = make_optimizer(config)
    empty = np.asarray(tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids, np.int32)
    step_fn = jax.jit(make_train_step(models, config, tx, empty, infinite_grads_at((3,))))
    batch = next(iter(make_dataset(train_cfg)))
    batch = {k: batch[k] for k in ("image", "mask", "latent_mask", "tokens")}
    like = meta.unbox(jax.eval_shape(init_state_fn(models, tx, config.train.seed)))
    _, before = restore_state(w, 3, like=like)
    after, metrics = step_fn(before, {"text": load_workdir(w)[1].text_params}, batch)
    assert not np.isfinite(float(metrics["grad_norm"])) and np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 4 and int(after.nonfinite_streak) == 1
    kept = ("params/", "opt_state/", "ema/")
    assert_trees_equal(flat(jax.device_get(before)), flat(jax.device_get(after)), kept)
    # a finite step changes all three (checkpoint 2 -> 3): the comparison above can fail
    two, three = flat(jax.device_get(restore_state(w, 2, like=like)[1])), flat(jax.device_get(before))
    for k in kept:
        assert any(not np.array_equal(two[x], three[x]) for x in two if x.startswith(k)), k


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, data_dir):
    from smartbrush_jax.train.loop import TrainingError
    from smartbrush_jax.train.step import infinite_grads_at

    w = _workdir(tmp_path, data_dir, "nan_many")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row .* last good checkpoint is step 4"):
        run_tiny(w, infinite_grads_at((4, 5, 6)), train__log_every=1)
    step, params = _params(w)
    assert step == 4 and all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize("mesh", [("data", ["--config.mesh.shape.data=8"]),
                                  ("fsdp", ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8",
                                            "--config.mesh.fsdp=True"])], ids=lambda m: m[0])
def test_eight_devices_match_one(tmp_path, one_device_run, data_dir, mesh):
    one = one_device_run  # in this process: one CPU device (built once for both meshes)
    eight = _workdir(tmp_path, data_dir, "eight")  # eight simulated devices need a process of their own
    proc = train(eight, "--config.train.log_every=1", *mesh[1], devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(summary(eight)), losses(summary(one)), rtol=1e-5)
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
        ("mesh.fsdp_gather", "twice", "must be one of"),
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
    proc = train(str(tmp_path / "w"), "--config.train.stepz=3", timeout=120)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_demo_inpaint_without_a_trained_run_is_a_clear_error(tmp_path, capsys):
    from smartbrush_jax.cli.demo import main

    assert main(["--workdir", str(tmp_path)]) == 2
    assert "train the demo first" in capsys.readouterr().err


def test_log_sets_the_measured_step_beside_the_estimate(tmp_path, data_dir):
    """The trainer's start-up estimate (the same as `smartbrush-aot`'s) is kept in
    summary.json, and every log point gives the measured step and measured / estimated:
    what recalibrates the planner on the first real accelerator run. A CPU has no spec
    sheet here: `train.peak_tflops` gives it a peak, so the estimate is FLOPs over it."""
    w = _workdir(tmp_path, data_dir, "estimate")
    summ = run_tiny(w, train__peak_tflops=0.001, train__steps=4, train__log_every=2)
    est = summ["estimate"]
    assert est["seconds"] > 0 and set(est["terms"]) == {"ops"} and "FLOPs only" in est["how"]["ops"]
    assert [h["step"] for h in summ["history"]] == [2, 4]
    for h in summ["history"]:
        assert h["step_seconds"] > 0
        assert h["measured_over_estimated"] == pytest.approx(h["step_seconds"] / est["seconds"])
