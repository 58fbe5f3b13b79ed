"""The launchers (launch/): local_multiprocess.sh trains as 2 processes x 4 CPU devices with
the per-step losses of 1 process x 8 devices; it prefixes, forwards SIGTERM and stops all
processes when one fails; tpu_vm.sh --dry-run prints the gcloud commands; slurm_gpu.sbatch
runs the trainer through srun and requeues a run that SIGTERM stopped early; every script is
valid bash and refuses bad arguments with exit 2."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
LOCAL = os.path.join(LAUNCH, "local_multiprocess.sh")
TPU_VM = os.path.join(LAUNCH, "tpu_vm.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
DEMO = os.path.join(ROOT, "configs", "cpu_demo.py")
STEPS = 3


@pytest.fixture(scope="module")
def same_data(tmp_path_factory):
    """A prepared set whose global batches do not depend on the number of processes.

    The pipeline gives each process its own shard of the records, shuffled and augmented
    with its own seed (as it should at scale), so 2 processes and 1 process see different
    examples and their losses differ. Here every seg record is one object filling its image
    (the object-centred crop is then the whole image, whatever the seed) with a label only
    (no caption to draw), every t2i record is one image, and seg and t2i are mixed 50/50,
    which grain interleaves seg, t2i, seg, ...: process i's half-batch equals the same
    half of the single process's batch. `test_data_is_the_same_for_one_or_two_processes`
    checks this; rows still differ in t, s, noise and text dropout (the step's RNG)."""
    from smartbrush_jax.data.prepare import ListSource, prepare
    from smartbrush_jax.data.sources import RawExample, mask_box
    from smartbrush_jax.data.synthetic import render_background
    from smartbrush_jax.models.tokenizer import write_word_tokenizer

    root = tmp_path_factory.mktemp("launch_data")
    rng = np.random.default_rng(0)
    size = 40
    yy, xx = np.mgrid[:size, :size]
    mask = ((xx - 19.5) / 19.0) ** 2 + ((yy - 19.5) / 13.0) ** 2 <= 1.0  # spans the width
    image, _ = render_background(rng, size)
    image[mask] = (220, 40, 40)
    scene, _ = render_background(rng, size)
    scene[8:30, 10:24] = (40, 80, 220)
    label, caption = "red ellipse", "a blue square on the left and stripes"

    def encoded(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    seg = [RawExample(f"launch:{i}", "launch", "seg", encoded(image), image, mask, label, "", mask_box(mask))
           for i in range(4)]
    t2i = [RawExample(f"launch:t{i}", "launch", "t2i", encoded(scene), scene, None, "", caption) for i in range(4)]
    prepared, tokenizer = str(root / "prepared"), str(root / "tokenizer")
    os.makedirs(prepared)
    prepare(prepared, {"seg": ListSource(seg), "t2i": ListSource(t2i)}, progress=False)
    write_word_tokenizer(tokenizer, [label, caption])
    return prepared, tokenizer


def _overrides(same_data):
    """cpu_demo's model, optimizer and batch (16) for a few steps, on `same_data`."""
    prepared, tokenizer = same_data
    return [f"--config={DEMO}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.sample_every=0", "--config.train.checkpoint_every=1000",
            "--config.data.synthetic_scenes=0", f"--config.data.prepared_dirs=('{prepared}',)",
            f"--config.model.tokenizer={tokenizer}", "--config.data.weights.seg=0.5",
            "--config.data.weights.t2i=0.5"]


def _env(devices=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if devices:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _summary(workdir, name="summary.json"):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def _losses(summary):
    return [h["loss"] for h in summary["history"] if "loss" in h]


def test_data_is_the_same_for_one_or_two_processes(same_data):
    from smartbrush_jax.data.pipeline import make_dataset
    from smartbrush_jax.settings import DataConfig

    def batches(index, count):
        cfg = DataConfig(prepared_dirs=[same_data[0]], tokenizer_dir=same_data[1], weights={"seg": 0.5, "t2i": 0.5},
                         resolution=32, batch_size=16 // count, read_threads=1)
        it = iter(make_dataset(cfg, index, count))
        return [next(it) for _ in range(STEPS)]

    one, two = batches(0, 1), [batches(i, 2) for i in range(2)]
    for step in range(STEPS):
        assert one[step]["is_t2i"].tolist() == [False, True] * 8
        for key in ("image", "mask", "latent_mask", "tokens"):
            np.testing.assert_array_equal(np.concatenate([two[0][step][key], two[1][step][key]]), one[step][key])


@pytest.mark.slow  # three trainers compiling at once: ~3 minutes on 2 cores
def test_two_processes_match_one_process_with_eight_devices(tmp_path, same_data):
    """The launcher's 2 x 4 run and a plain 1 x 8 run, started together (most of each is
    compiling): the same losses at every step, the same parameters at the end."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = _overrides(same_data)
    started = time.time()
    ref = subprocess.Popen([sys.executable, "-m", "smartbrush_jax.train", *args, f"--workdir={one}"], cwd=ROOT,
                           env=_env(devices=8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launched = subprocess.Popen([LOCAL, "-n", "2", "-d", "4", "--python", sys.executable, "--", *args,
                                 f"--workdir={two}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    out, err = launched.communicate(timeout=900)
    _, ref_err = ref.communicate(timeout=900)
    print(f"1 x 8 and 2 x 4 runs of {STEPS} steps together: {time.time() - started:.0f} s")
    assert ref.returncode == 0, ref_err[-3000:]
    assert launched.returncode == 0, err[-3000:]
    # process 0's lines on stdout, the others' on stderr, each prefixed
    assert "[p0] " in out and "[p1] " not in out and "[p1] " in err
    assert "process 1/2, 8 devices (cpu)" in err

    losses = _losses(_summary(two))
    assert len(losses) == STEPS
    assert _losses(_summary(two, "summary_process1.json")) == losses  # both report the global loss
    np.testing.assert_allclose(losses, _losses(_summary(one)), rtol=1e-5)

    from smartbrush_jax.checkpoints import restore_params

    (s1, a), (s2, b) = restore_params(one), restore_params(two)
    assert s1 == s2 == STEPS
    for path, x in _leaves(a):
        y = _lookup(b, path)
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * max(1.0, float(np.abs(x).max())), err_msg=path)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def _lookup(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return np.asarray(tree)


# ---------------------------------------------------------------------- local launcher, no JAX

FAKE_TRAINER = """#!/usr/bin/env bash
# stands in for python: `-m smartbrush_jax.train ARGS`; behaviour from FAKE_MODE
for a in "$@"; do [[ $a == --process_id=* ]] && id=${a#*=}; done
trap 'echo "process $id: SIGTERM, saved"; exit 0' TERM
touch "$FAKE_DIR/started_$id"
echo "process $id: $* | JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS=$XLA_FLAGS"
echo "process $id: a log line on stderr" >&2
case "$FAKE_MODE" in
  ok) exit 0 ;;
  fail) if [[ $id == 1 ]]; then exit 3; fi ;;
esac
for _ in $(seq 600); do sleep 0.05; done  # until signalled (30 s at most)
exit 9
"""


@pytest.fixture
def fake_trainer(tmp_path):
    path = tmp_path / "fake_python"
    path.write_text(FAKE_TRAINER)
    path.chmod(0o755)
    return str(path)


def _launch(fake, mode, *extra):
    env = dict(os.environ, FAKE_MODE=mode, FAKE_DIR=os.path.dirname(fake))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([LOCAL, "-n", "3", "-d", "2", "-p", "12345", "--python", fake, "--",
                             "--config=c.py", "--workdir=w", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_local_launcher_starts_each_process_with_its_flags(fake_trainer):
    p = _launch(fake_trainer, "ok", "--config.train.steps=3")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    for i in range(3):
        stream = out if i == 0 else err
        assert (f"[p{i}] process {i}: -m smartbrush_jax.train --config=c.py --workdir=w --config.train.steps=3 "
                f"--coordinator_address=localhost:12345 --num_processes=3 --process_id={i} | JAX_PLATFORMS=cpu "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=2") in stream
        assert f"[p{i}] process {i}: a log line on stderr" in stream


def test_local_launcher_stops_all_when_one_fails(fake_trainer):
    started = time.time()
    p = _launch(fake_trainer, "fail")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    assert time.time() - started < 15  # the others were killed, not waited for (30 s)
    assert "process 1 exited with code 3; stopping the others" in err


def test_local_launcher_forwards_sigterm(fake_trainer):
    p = _launch(fake_trainer, "wait")
    started = [os.path.join(os.path.dirname(fake_trainer), f"started_{i}") for i in range(3)]
    deadline = time.time() + 30
    while not all(map(os.path.exists, started)) and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "[p0] process 0: SIGTERM, saved" in out
    assert "[p1] process 1: SIGTERM, saved" in err and "[p2] process 2: SIGTERM, saved" in err


@pytest.mark.parametrize("args", [["-n", "0", "--", "--config=c"], ["-d", "x", "--", "--config=c"], ["-n"],
                                  ["--bogus", "--", "--config=c"], ["-p", "70000", "--", "--config=c"], [],
                                  ["--config=c"]], ids=str)
def test_local_launcher_refuses_bad_arguments(args):
    p = subprocess.run([LOCAL, *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "usage: launch/local_multiprocess.sh" in p.stderr


# ---------------------------------------------------------------------- Cloud TPU VM

def _dry_run(*args, env=None):
    p = subprocess.run([TPU_VM, "--dry-run", *args], capture_output=True, text=True, timeout=30, env=env)
    return p, [c for c in p.stdout.split("\n+ ")]


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    p, cmds = _dry_run("--project=proj", "--zone=us-central2-b", "--name=sb", "--workdir=gs://bucket/runs/sb",
                       "--delete", "--", "--config.train.steps=10")
    assert p.returncode == 0, p.stderr
    loc = "--zone=us-central2-b --project=proj"

    def one(prefix):
        found = [c for c in cmds if c.lstrip("+ ").startswith(prefix)]
        assert len(found) == 1, (prefix, p.stdout)
        return found[0]

    one(f"gcloud compute tpus queued-resources describe sb {loc}")
    one(f"gcloud alpha compute tpus queued-resources create sb {loc} --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --node-id=sb --autocheckpoint-enabled")
    one(f"git -C {ROOT} archive --format=tar.gz")
    assert one("gcloud compute tpus tpu-vm scp /").endswith(f"sb:smartbrush.tar.gz {loc} --worker=all")
    ssh = [c for c in cmds if c.startswith(f"gcloud compute tpus tpu-vm ssh sb {loc} --worker=all --command='")]
    assert len(ssh) == 2, p.stdout
    setup, train = ssh
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        jax_pin = next(line.strip() for line in f if line.startswith("jax=="))
    assert "pip install -q -r requirements.txt" in setup and f"jax[tpu]=={jax_pin[5:]}" in setup
    assert ("python -m smartbrush_jax.train --config=configs/tpu_v4.py --workdir=gs://bucket/runs/sb "
            "--distributed --config.train.steps=10") in train
    assert "gcsfuse" not in p.stdout  # the workdir is written through the GCS API, never a mount
    one(f"gcloud compute tpus queued-resources delete sb {loc} --force --quiet")
    assert cmds.index(train) < cmds.index(one("gcloud compute tpus queued-resources delete"))


@pytest.mark.parametrize("accelerator,runtime,autocheckpoint", [
    ("v4-32", "tpu-ubuntu2204-base", True), ("v5litepod-16", "v2-alpha-tpuv5-lite", True),
    ("v5p-128", "v2-alpha-tpuv5", False), ("v6e-256", "v2-alpha-tpuv6e", False)])
def test_tpu_vm_runtime_and_autocheckpoint_follow_the_accelerator(accelerator, runtime, autocheckpoint):
    p, cmds = _dry_run("--zone=z", "--workdir=gs://b/r", f"--accelerator-type={accelerator}", "--spot")
    assert p.returncode == 0, p.stderr
    create = next(c for c in cmds if "queued-resources create" in c)
    assert f"--accelerator-type={accelerator} --runtime-version={runtime} --node-id=smartbrush --spot" in create
    assert ("--autocheckpoint-enabled" in create) == autocheckpoint
    assert create.startswith("gcloud alpha ") == autocheckpoint  # the preview flag needs the alpha command


def test_tpu_vm_multislice_asks_for_slices_and_spans_the_data_axis_over_them():
    p, cmds = _dry_run("--zone=z", "--workdir=gs://b/r", "--accelerator-type=v5p-128", "--slices=2", "--skip-setup")
    assert p.returncode == 0, p.stderr
    create = next(c for c in cmds if "queued-resources create" in c)
    assert "--node-count=2 --node-prefix=smartbrush" in create and "--node-id" not in create
    trains = [c for c in cmds if "smartbrush_jax.train" in c]
    assert [t.split()[5] for t in trains] == ["smartbrush-0", "smartbrush-1"]  # every worker of both slices
    assert all("--config.mesh.dcn_shape.data=2" in t and "--workdir=gs://b/r" in t for t in trains)


def test_tpu_vm_data_buckets_are_mounted_read_only_and_never_hold_checkpoints():
    p, cmds = _dry_run("--zone=z", "--workdir=gs://runs/sb", "--data-bucket=data", "--skip-setup")
    assert p.returncode == 0, p.stderr
    train = next(c for c in cmds if "smartbrush_jax.train" in c)
    assert "gcsfuse -o ro --implicit-dirs --file-cache-max-size-mb=-1" in train and " data /mnt/gcs/data" in train
    assert "--workdir=gs://runs/sb " in train and "/mnt/gcs/runs" not in train
    assert "$USER" not in p.stdout  # remote paths are the ssh user's own home (OS Login names differ)


def test_tpu_vm_relaunch_recreates_a_preempted_spot_slice(tmp_path):
    from launch_fakes import run_tpu_vm

    p, calls, fake = run_tpu_vm(tmp_path, "SUSPENDED", "ok", "--spot", "--detach")
    assert p.returncode == 0, p.stderr
    assert "is SUSPENDED (preempted or failed): deleting it and asking again" in p.stderr
    lines = calls.splitlines()
    delete = next(i for i, c in enumerate(lines) if c.startswith("compute tpus queued-resources delete sb"))
    create = next(i for i, c in enumerate(lines) if "queued-resources create sb" in c)
    assert delete < create and "--spot" in lines[create]
    assert (fake / "worker0" / "trainer_calls").read_text().startswith("trainer -m smartbrush_jax.train")


@pytest.mark.parametrize("args,message", [(["--zone=z"], "WORKDIR is required"),
                                          (["--workdir=gs://b/r"], "ZONE is required"),
                                          (["--zone=z", "--workdir=/home/me/runs/sb"], "must be a gs:// URL"),
                                          (["--zone=z", "--workdir=gs://b/r", "--accelerator-type=tpu9-8"],
                                           "unknown accelerator type"),
                                          (["--zone=z", "--workdir=gs://b/r", "--slices=0"], "--slices"),
                                          (["--zone=z", "--workdir=gs://b/r", "--no-gcsfuse"], "unknown argument"),
                                          (["--zone=z", "--workdir=gs://b/r", "--detach", "--delete"], "exclude")])
def test_tpu_vm_refuses_missing_parameters(args, message):
    env = {k: v for k, v in os.environ.items() if k not in ("WORKDIR", "ZONE")}
    p = subprocess.run([TPU_VM, "--dry-run", *args], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2
    assert message in p.stderr and "usage: launch/tpu_vm.sh" in p.stderr


# ---------------------------------------------------------------------- SLURM

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$*" > "$FAKE_DIR/srun_args"
printf '%s\\n' "$XLA_FLAGS" > "$FAKE_DIR/xla_flags"
case "$FAKE_MODE" in
  done) echo '{"history": []}' > "$WORKDIR/summary.json" ;;  # the last step was reached
  fail) exit 1 ;;
esac  # stopped: SIGTERM, checkpoint saved, exit 0, no summary
"""


def _sbatch(tmp_path, mode):
    """Runs the job script with srun and scontrol stood in for; returns the finished process
    and the work folder. `mode`: the trainers finish ("done"), stop early ("stopped") or fail."""
    bin_dir, workdir = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    workdir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scontrol"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    old = workdir / "summary.json"  # from an earlier, shorter run: not a sign of this one finishing
    old.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_MODE=mode,
               WORKDIR=str(workdir), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="7")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(["bash", SLURM, "--config.train.steps=5"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=str(tmp_path))
    return p, workdir


@pytest.mark.parametrize("mode,rc,requeued", [("done", 0, False), ("stopped", 0, True), ("fail", 1, False)])
def test_slurm_job_runs_the_trainer_and_requeues_a_stopped_run(tmp_path, mode, rc, requeued):
    p, workdir = _sbatch(tmp_path, mode)
    assert p.returncode == rc, p.stderr
    srun = (tmp_path / "srun_args").read_text().strip()
    assert srun == (f"--kill-on-bad-exit=1 --cpus-per-task=7 {ROOT}/.venv/bin/python -m smartbrush_jax.train "
                    f"--config=configs/gpu_h100.py --workdir={workdir} --distributed --config.train.steps=5")
    assert (tmp_path / "scontrol").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol").read_text().strip() == "requeue 4242"


def test_slurm_xla_flags_exist_in_this_jaxlib(tmp_path):
    """XLA aborts on an unknown flag name at start-up, on any backend: the H100 flags of
    the sbatch script must parse under the pinned jaxlib."""
    p, _ = _sbatch(tmp_path, "done")
    assert p.returncode == 0, p.stderr
    flags = (tmp_path / "xla_flags").read_text().strip()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    p = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags))
    assert p.returncode == 0 and "CpuDevice" in p.stdout, p.stderr[-2000:]


# ---------------------------------------------------------------------- all

@pytest.mark.parametrize("script", [LOCAL, TPU_VM, SLURM], ids=os.path.basename)
def test_scripts_are_valid_bash(script):
    p = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert os.access(script, os.X_OK)
