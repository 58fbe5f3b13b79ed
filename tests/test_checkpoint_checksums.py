"""Checkpoints that cannot silently lie (issue 36): every saved step carries a checksum of
each array (`smartbrush_jax/array_checksums.py`), checked whenever a step is read.

- The checksum against a NumPy closed form, for every dtype a train state holds, and the
  same value whatever the sharding (8 simulated devices).
- Bytes flipped inside the newest step's OCDBT data file, its size unchanged (what a bad
  disk or a copy by another tool does; before, the trainer resumed from it and inpaint
  sampled from it without a word): resume moves the step aside naming the array and ends
  bit-identical to a run that never saw the damage; inpaint and export refuse, exit 2.
- A step saved before checksums existed still loads, with one line saying so.
The same on a gs:// workdir is in test_cloud_storage.py.
"""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import ROOT, assert_trees_equal, copy_run, env, state, steps_on_disk, summary, train


def _reference_sums(x: np.ndarray):
    """(a, b) of array_checksums.py's docstring in NumPy uint64 arithmetic, reduced mod 2**32."""
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    u = np.ascontiguousarray(x).reshape(-1).view(bits).astype(np.uint64)
    i = np.arange(u.size, dtype=np.uint64)
    m = np.uint64(2**32 - 1)
    a = int(np.sum((u * (2 * i + 1)) & m) & m)
    h = (u + i * np.uint64(0x9E3779B9)) & m
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & m
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & m
    h ^= h >> np.uint64(16)
    b = int(np.sum(h) & m)
    return f"{a:08x}-{b:08x}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_host", [True, False], ids=["numpy", "xla"])
def test_checksums_equal_the_numpy_closed_form_and_see_one_changed_element(on_host, monkeypatch):
    """Both ways of summing (NumPy for shards in host memory, a jitted program on the
    device for TPUs and GPUs) against the closed form."""
    import jax.numpy as jnp
    import ml_dtypes

    from smartbrush_jax import array_checksums as checksums

    real = checksums.compute
    monkeypatch.setattr(checksums, "compute", lambda tree, on_host_=on_host: real(tree, on_host=on_host_))
    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(37, 5)).astype(np.float32),
            "bf16": rng.normal(size=(300,)).astype(ml_dtypes.bfloat16), "i32": np.array(7, np.int32),
            "u8": rng.integers(0, 255, (3, 4, 5)).astype(np.uint8),
            "empty": np.zeros((0, 3), np.float32)}
    record = checksums.compute({k: jnp.asarray(v) for k, v in tree.items()})
    assert record["format"] == checksums.FORMAT
    for name, x in tree.items():
        assert record["arrays"][name]["sum"] == _reference_sums(x), name
        assert record["arrays"][name]["shape"] == list(x.shape)
    # any single element changed by one bit, and two elements swapped, change the checksum
    for flip in range(8):
        damaged = tree["f32"].copy()
        damaged.view(np.uint32)[flip % 37, flip % 5] ^= np.uint32(1 << (flip * 4))
        assert _reference_sums(damaged) != record["arrays"]["f32"]["sum"]
        with pytest.raises(checksums.ChecksumMismatch, match="array f32 does not match"):
            checksums.verify({**{k: jnp.asarray(v) for k, v in tree.items()}, "f32": jnp.asarray(damaged)}, record)
    swapped = tree["f32"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksums.compute({"f32": jnp.asarray(swapped)})["arrays"]["f32"]["sum"] != record["arrays"]["f32"]["sum"]
    assert checksums.verify({k: jnp.asarray(v) for k, v in tree.items()}, record) == len(tree)
    with pytest.raises(checksums.ChecksumMismatch, match="array i32 .*not restored"):
        checksums.verify({k: jnp.asarray(v) for k, v in tree.items() if k != "i32"}, record)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from smartbrush_jax import array_checksums as checksums
x = np.random.default_rng(1).normal(size=(64, 24)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
sums = [checksums.compute({"x": jnp.asarray(x)})["arrays"]["x"]["sum"]]
for spec in (P("data", "model"), P("data", None), P(None, "model"), P()):  # split, partly and wholly replicated
    spread = jax.device_put(x, NamedSharding(mesh, spec))
    assert len(spread.addressable_shards) == 8
    for on_host in (True, False):
        sums.append(checksums.compute({"x": spread}, on_host=on_host)["arrays"]["x"]["sum"])
print(" ".join(sums))
"""


@pytest.mark.timeout(120)
def test_checksum_is_the_same_whatever_the_sharding():
    """A pod saves, a laptop reads: the checksum of an array split over 8 devices, or copied
    on some of them, equals the one of the same array on one device, and the closed form
    (each distinct piece counted once). No collective runs: 8 simulated CPU devices once
    hung in per-array all-reduces."""
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=100,
                          env=env(devices=8), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = np.random.default_rng(1).normal(size=(64, 24)).astype(np.float32)
    assert proc.stdout.split() == [_reference_sums(x)] * 9


def flip_bytes(step_dir, count=4):
    """Invert `count` bytes inside one array's stored bytes in the step's OCDBT data files,
    size unchanged; returns the file. The place is found, not guessed: the step is restored
    (from its folder as it lies, a run's or a bucket's on the emulator's disk) and the
    largest array whose raw bytes a data file holds verbatim is the one changed. The middle
    of the largest file may be a B-tree node or bytes no read touches (seen on gs://: the
    read then succeeded, or failed as damage, neither of which is the case under test)."""
    import jax

    from smartbrush_jax.checkpoints import restore_state

    run, step = os.path.dirname(os.path.dirname(step_dir)), int(os.path.basename(step_dir))
    _, state = restore_state(run, step)
    arrays = sorted((np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(state)), key=len, reverse=True)
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")) if os.path.isfile(f)]
    assert files, os.listdir(os.path.join(step_dir, "state"))
    contents = {f: open(f, "rb").read() for f in files}
    for raw in (a for a in arrays if len(a) >= 256):
        for path, data in contents.items():
            at = data.find(raw[:64])
            if at >= 0 and data[at:at + len(raw)] == raw:
                where = at + len(raw) // 2
                with open(path, "r+b") as f:
                    f.seek(where)
                    f.write(bytes(b ^ 0xFF for b in data[where:where + count]))
                assert os.path.getsize(path) == len(data)
                return path
    raise AssertionError(f"no array's raw bytes found in {step_dir}'s data files")


@pytest.mark.timeout(900)
def test_flipped_bytes_in_the_newest_step_are_caught_by_resume_inpaint_and_export(tmp_path, tiny_run):
    reference = copy_run(tiny_run, tmp_path / "reference")
    proc = train(reference, "--config.train.steps=6")
    assert proc.returncode == 0 and "resumed from step 4" in proc.stderr, proc.stderr[-3000:]

    w = copy_run(tiny_run, tmp_path / "flipped")
    flip_bytes(os.path.join(w, "checkpoints", "4"))

    # readers: refuse with the step and the array named, change nothing
    from PIL import Image

    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(tmp_path / "in.png")
    for name in ("inpaint", "export"):
        proc = subprocess.run([sys.executable, "-c", _CLI.format(name=name, workdir=w, tmp=str(tmp_path))],
                              capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        err = proc.stderr.strip().splitlines()
        assert err[-1].startswith("error: checkpoint step 4 in ") and "is damaged: array " in err[-1], err[-3:]
        assert "does not match the checksum saved with it" in err[-1] and "--step 2" in err[-1]
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "inpainted") and not os.path.exists(tmp_path / "export")
    assert steps_on_disk(w) == ["2", "4"]

    # the trainer: step 4 moved aside naming the array, resumed from step 2, bit-identical to the reference
    proc = train(w, "--config.train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 4 cannot be restored (array " in proc.stderr, proc.stderr[-3000:]
    assert "does not match the checksum saved with it" in proc.stderr and "moved to" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    assert steps_on_disk(w) == ["2", "4", "4.corrupt", "6"]
    assert_trees_equal(state(reference, 6)[1], state(w, 6)[1])
    assert summary(w)["steps"] == 6


_CLI = """
import sys
from smartbrush_jax.cli.{name} import main
args = {{"inpaint": ["--checkpoint", {workdir!r}, "--image", {tmp!r} + "/in.png", "--box", "4,4,16,16", "--prompt",
                    "a red circle", "--steps", "2", "--out", {tmp!r} + "/inpainted"],
        "export": ["--workdir", {workdir!r}, "--out", {tmp!r} + "/export"]}}["{name}"]
sys.exit(main(args))
"""


@pytest.mark.timeout(300)
def test_a_step_saved_before_checksums_loads_with_one_warning(tmp_path, tiny_run, capsys):
    import shutil

    from smartbrush_jax.checkpoints import restore_params

    w = copy_run(tiny_run, tmp_path / "old")
    for step in ("2", "4"):
        shutil.rmtree(os.path.join(w, "checkpoints", step, "checksums"))
    step, params = restore_params(w)
    assert step == 4 and params
    err = capsys.readouterr().err
    assert err.count("was saved without checksums") == 1 and "cannot be verified" in err
    assert steps_on_disk(w) == ["2", "4"]
