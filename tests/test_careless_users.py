"""Hostile and careless input, round two (issue 24): each test is one row of the README's
fault table, with the input that row names.

1. data: polygons pycocotools cannot take (1e308 segfaulted it, 1e10 took gigabytes),
   RLE counts that overrun the image, a prepare worker that dies, captions that are not
   text;
2. the other rows live beside the code they test: test_inpaint_safety.py (inpaint's and
   the app's output, memory and numbers), test_train_guard.py (the workdir lock, config
   overrides, a full disk) and test_cloud_storage.py / test_faults.py (restores that fail
   without damage).
"""

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from smartbrush_jax.data.sources import read_captions, read_webdataset
from smartbrush_jax.data.validate import Counter, Skip, check_caption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(tmp_path, n=6):
    from smartbrush_jax.data.synthetic import write_dataset

    return write_dataset(str(tmp_path / "raw"), n, 24, seed=3)


def _prepare(*args):
    from smartbrush_jax.cli.prepare import main

    return main([str(a) for a in args])


def _with_annotations(raw, extra):
    """The synthetic COCO file plus `extra` annotations on its first image."""
    coco = json.load(open(raw["annotations"]))
    image = coco["images"][0]
    for i, segm in enumerate(extra):
        coco["annotations"].append({"id": 90000 + i, "image_id": image["id"], "category_id": 1, "iscrowd": 0,
                                    "segmentation": segm})
    json.dump(coco, open(raw["annotations"], "w"))
    return coco


HUGE = [1e308, 3e9, -3e9, 1e10, 1e20, float("nan"), float("inf"), -float("inf")]


def test_prepare_polygon_with_a_coordinate_of_1e308_or_nan_is_counted_not_a_crash(tmp_path):
    """Row: `prepare` on a COCO file where one polygon has a coordinate of 1e308, 3e9, -3e9,
    1e10, 1e20, NaN or inf (or is not a list of numbers): each such annotation is a counted
    `bad_polygon`, the rest is prepared, exit 0, in seconds. Run in a child process: before
    the fix 1e308 segfaulted it and 1e10 was killed for memory."""
    raw = _synthetic(tmp_path)
    bad = [[[10, 10, v, 10, 20, 20]] for v in HUGE]
    bad += [[["a", 1, 2, 3, 4, 5]], [[10, 10, 20, 10, 20]], [[True, 1, 20, 1, 20, 20]], [{"x": 1}],
            {"size": [24, 24], "counts": [10**9, 5]}, {"size": [24, 24], "counts": [100, -3, 479]},
            {"size": [24, 24], "counts": "\x7f\x7f"}, {"size": "24x24", "counts": "PP"}, {"size": [24, 24]}]
    coco = _with_annotations(raw, bad)
    out = tmp_path / "prepared"
    code = ("import sys; from smartbrush_jax.cli.prepare import main; sys.exit(main(sys.argv[1:]))")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(out), "--coco-annotations", raw["annotations"],
                           "--coco-images", raw["images"], "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - t0 < 120
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped"]["coco"]["bad_polygon"] == len(bad)
    assert meta["components"]["seg"]["count"] == len(coco["annotations"]) - len(bad)


def test_a_polygon_just_past_the_border_is_still_read():
    """Real files stray a little past the image (COCO's own polygons do): that is not bad."""
    from pycocotools import mask as mask_utils

    from smartbrush_jax.data.sources import _coco_mask

    m = _coco_mask([[-0.5, -0.5, 30.4, -0.5, 30.4, 30.4, -0.5, 30.4]], 24, 24, mask_utils)
    assert m.all()
    with pytest.raises(Skip, match="bad_polygon"):
        _coco_mask([[-25, 0, 10, 0, 10, 10]], 24, 24, mask_utils)


def test_compressed_rle_counts_match_pycocotools():
    """Our reading of COCO's compressed RLE string (to check its counts before pycocotools
    decodes them) against pycocotools' own encoding of random masks."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from smartbrush_jax.data.sources import rle_string_counts

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 50, 2)
        m = np.asfortranarray(rng.random((h, w)) < rng.random())
        counts = rle_string_counts(mask_utils.encode(m)["counts"])
        flat = m.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        assert counts == (runs if not flat[0] else [0] + runs)


def test_prepare_with_workers_2_reports_a_dead_worker_and_never_hangs(tmp_path):
    """Row: the same with `--workers 2` hung at 3 of 4 work units. A worker killed mid-unit
    (SIGKILL, as the kernel's OOM killer sends) ends the command in seconds with one line
    and exit 1; the finished units are kept and the same command resumes to the end."""
    raw = _synthetic(tmp_path, n=8)
    out = tmp_path / "prepared"
    args = ["--out", str(out), "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
            "--workers", "2", "--unit-images", "1", "--quiet"]
    killer = ("import os, signal, sys\n"
              "from smartbrush_jax.data import prepare, units\n"
              "def run_unit(j):\n"
              "    if j == 5:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return units.run_unit(j)\n"
              "prepare.run_unit = run_unit\n"
              "from smartbrush_jax.cli.prepare import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", killer, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a prepare worker process died") and "rerun the same command" in last
    assert "Traceback" not in proc.stderr
    assert not out.exists() and os.path.isdir(str(out) + ".partial")
    assert _prepare(*args) == 0
    assert json.loads((out / "metadata.json").read_text())["components"]["seg"]["count"] > 0


@pytest.mark.parametrize("value", [None, 5, 2.5, True, [1, 2], {"a": 1}])
def test_captions_that_are_null_a_number_a_list_or_an_object_are_counted_bad_caption(tmp_path, value):
    """Row: caption lines whose caption is null, a number, a list or an object (side file or
    webdataset `.json`) became the texts "None", "5", "[1, 2]"; now `bad_caption`."""
    with pytest.raises(Skip, match="bad_caption"):
        check_caption(value)
    side = tmp_path / "captions.jsonl"
    side.write_text(json.dumps({"annotation_id": 1, "caption": "a red square"}) + "\n"
                    + json.dumps({"annotation_id": 2, "caption": value}) + "\n")
    counts = Counter()
    assert read_captions(str(side), counts) == {"1": "a red square"}
    assert counts == {"bad_caption": 1}

    import io

    from data_fixtures import png_bytes, rgb

    shard = str(tmp_path / "pairs.tar")
    with tarfile.open(shard, "w") as tar:
        for key, meta in (("000", {"caption": "a red square"}), ("001", {"caption": value}), ("002", [value])):
            for ext, data in ((".png", png_bytes(rgb(8, 8, 0))), (".json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    counts = Counter()
    got = [ex.caption for ex in read_webdataset([shard], counts)]
    assert got == ["a red square"] and counts == {"bad_caption": 2}


_WATCH_IMPORTS = r"""
import sys, threading
from etils import epy
entered = []
real = epy.lazy_imports
def watched(*args, **kwargs):  # the threads that swap builtins.__import__
    entered.append(threading.current_thread() is threading.main_thread())
    return real(*args, **kwargs)
epy.lazy_imports = watched
from smartbrush_jax.data.records import unpack_record
import smartbrush_jax.data.pipeline, smartbrush_jax.checkpoints
data = open(sys.argv[1], "rb").read()
reader = threading.Thread(target=unpack_record, args=(data,))
reader.start()
reader.join()
print("on a reader thread" if False in entered else "clean")
"""


def test_a_good_gs_checkpoint_is_not_demoted_by_a_reader_thread_patching_imports(tmp_path):
    """Row: the gs:// checkpoint demoted to `.corrupt` (see test_cloud_storage.py for the run
    itself). The cause: a Grain read thread's first record imported tensorflow_datasets,
    whose `epy.lazy_imports()` swaps `builtins.__import__` process-wide, while Orbax's
    restore threads were importing. Reading records on a thread must never do that: every
    entry into `epy.lazy_imports` is recorded while a thread reads the first record."""
    from smartbrush_jax.data.records import pack_record

    path = tmp_path / "record.bin"
    path.write_bytes(pack_record({"id": "x", "kind": "seg", "caption": "a square"}))
    proc = subprocess.run([sys.executable, "-c", _WATCH_IMPORTS, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "clean"


def _command_args(name, tmp_path, tiny_run, sd_folder):
    """A command and arguments that would work, but for `--out`."""
    if name == "prepare":
        raw = _synthetic(tmp_path)
        return "smartbrush_jax.cli.prepare", ["--coco-annotations", raw["annotations"], "--coco-images", raw["images"]]
    if name == "latents":
        return "smartbrush_jax.cli.latents", ["--prepared", os.path.join(tiny_run, "data", "prepared"), "--vae",
                                             sd_folder[0], "--resolution", "16"]
    if name == "export":
        return "smartbrush_jax.cli.export", ["--workdir", tiny_run]
    if name == "convert":
        (tmp_path / "sd.safetensors").write_bytes(b"not read: the output is checked first")
        return "smartbrush_jax.cli.convert", ["--ckpt", str(tmp_path / "sd.safetensors"), "--tokenizer",
                                             os.path.join(tiny_run, "tokenizer")]
    return "smartbrush_jax.cli.synthetic", ["--num-scenes", "2"]


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
@pytest.mark.parametrize("name", ["prepare", "latents", "export", "convert", "synthetic"])
def test_every_commands_out_under_a_file_or_proc_is_one_line_before_any_work(tmp_path, tiny_run, sd_folder, name,
                                                                             where):
    """What to build 2: every command's output path, probed as inpaint's was: under a file,
    or somewhere nothing can be created (/proc). Exit 2, one line naming the path, before
    any work (the check that makes a probe file beside the output, outputs.check_writable)."""
    import importlib

    module, args = _command_args(name, tmp_path, tiny_run, sd_folder)
    if where == "under a file":
        (tmp_path / "a_file").write_bytes(b"x")
        out = str(tmp_path / "a_file" / "out")
    else:
        out = "/proc/smartbrush/out"
    main = importlib.import_module(module).main
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, "--out", out])
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert lines[-1].startswith("error: --out") and out in lines[-1], err.getvalue()
    assert ("which is a file" if where == "under a file" else "cannot write in") in lines[-1]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_latents_crop_context_nan_inf_or_negative_is_exit_2(tmp_path, tiny_run, sd_folder, capsys, value):
    from smartbrush_jax.cli.latents import main

    module, args = _command_args("latents", tmp_path, tiny_run, sd_folder)
    assert main([*args, "--out", str(tmp_path / "cache"), "--crop-context", value, "3"]) == 2
    assert "--crop-context" in capsys.readouterr().err and not (tmp_path / "cache").exists()
