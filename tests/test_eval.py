"""eval/fid.py end to end on the demo's export, with randomly initialised Inception and
CLIP weights saved to local files (numbers meaningless, pipeline real): outputs, the
background kept, resuming from the cache, and bad input refused with exit code 2."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from metrics_fixtures import random_inception_state, write_tiny_clip
from PIL import Image

from smartbrush_jax.metrics import EvalSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID = os.path.join(ROOT, "eval", "fid.py")


def _fid_module():
    spec = importlib.util.spec_from_file_location("eval_fid", FID)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_weights")
    inception = str(root / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(random_inception_state(), inception)
    clip = str(root / "clip")
    os.makedirs(clip)
    write_tiny_clip(clip, ["blue circle", "orange square", "purple star", "green triangle"])
    return inception, clip


def _run(demo_export, data, weights, out, *extra):
    cmd = [sys.executable, FID, "--model", demo_export, "--data", data, "--inception", weights[0], "--clip",
           weights[1], "--out", out, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_eval_end_to_end_and_resume(demo_run, demo_export, weights, tmp_path):
    data, out = os.path.join(demo_run, "data", "heldout"), str(tmp_path / "eval")
    proc = _run(demo_export, data, weights, out, "--num", "3", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[6/6]" in proc.stderr and "generated" in proc.stderr

    results = json.load(open(os.path.join(out, "results.json")))
    assert results["num_items"] == 3 and set(results["metrics"]) == {"accurate", "bbox"}
    for m in results["metrics"].values():
        assert np.isfinite([m["fid"], m["local_fid"], m["clip"]]).all()
        assert m["fid"] > 0 and m["local_fid"] > 0 and 0 <= m["clip"] <= 100
    table = open(os.path.join(out, "results.md")).read().splitlines()
    assert table[0].startswith("| Method | accurate FID") and table[2].startswith("| model (n=3) |")
    grid = Image.open(os.path.join(out, "examples.png"))
    assert grid.size == (6 * 128, 3 * 128)

    items = list(EvalSet(data, limit=3).items())
    for mask_type in ("accurate", "bbox"):
        for item in items:
            gen = np.asarray(Image.open(os.path.join(out, "generated", mask_type, f"{item.key}.png")))
            pred = np.asarray(Image.open(os.path.join(out, "generated", mask_type, f"{item.key}_mask.png"))) > 127
            ys, xs = np.nonzero(item.mask)
            region = np.zeros_like(item.mask)
            region[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            region = item.mask if mask_type == "accurate" else region
            assert (gen[~region] == item.image[~region]).all()  # the background is untouched
            assert not (pred & ~region).any()

    # the numbers are those of the cached generations: recomputed here from the PNGs
    from smartbrush_jax.metrics import (
        INPUT_SIZE,
        ClipScorer,
        fid_from_features,
        inception_features,
        load_inception,
        local_crop,
        resize_uint8,
    )

    inception, clip = load_inception(weights[0]), ClipScorer(weights[1])
    real = inception_features(inception, [resize_uint8(it.image, INPUT_SIZE) for it in items])
    real_crops = inception_features(inception, [local_crop(it.image, it.mask) for it in items])
    prompts = [it.prompt for it in items]
    for mask_type in ("accurate", "bbox"):
        gen = [np.asarray(Image.open(os.path.join(out, "generated", mask_type, f"{it.key}.png")).convert("RGB"))
               for it in items]
        crops = [local_crop(g, it.mask) for g, it in zip(gen, items)]
        expected = {"fid": fid_from_features(real, inception_features(inception, [resize_uint8(g, INPUT_SIZE)
                                                                                  for g in gen])),
                    "local_fid": fid_from_features(real_crops, inception_features(inception, crops)),
                    "clip": float(np.mean(clip(crops, prompts)))}
        for name, value in expected.items():
            assert results["metrics"][mask_type][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (mask_type, name)
    assert results["clip_real"] == pytest.approx(float(np.mean(clip([local_crop(it.image, it.mask) for it in items],
                                                                    prompts))), rel=1e-6)

    again = _run(demo_export, data, weights, out, "--num", "3", "--steps", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("cached") == 6 and " generated " not in again.stderr
    assert json.load(open(os.path.join(out, "results.json")))["metrics"] == results["metrics"]

    other = _run(demo_export, data, weights, out, "--num", "3", "--steps", "3")
    assert other.returncode == 2 and "other settings" in other.stderr


def test_eval_bad_input_exits_2(demo_export, weights, tmp_path, capsys):
    fid = _fid_module()
    images = tmp_path / "set"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(images / "a_mask.png")
    rows = [("a.png", "a_mask.png", "a red star"), ("b.png", "a_mask.png", "a cat")]
    csv_path = str(images / "set.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("image", "mask", "prompt"), *rows])
    base = ["--model", demo_export, "--inception", weights[0], "--clip", weights[1], "--out", str(tmp_path / "o")]

    def error(*args):
        assert fid.main([*base, *args]) == 2
        return capsys.readouterr().err

    err = error("--data", csv_path)
    assert "1 files are missing" in err and "b.png" in err
    assert "not found" in error("--data", str(tmp_path / "nowhere"))
    good = str(images / "good.csv")
    with open(good, "w", newline="") as f:
        csv.writer(f).writerows([("image", "mask", "prompt"), rows[0]])
    assert len(EvalSet(good)) == 1 and next(EvalSet(good).items()).mask.all()

    bad_inception = str(tmp_path / "wrong.pth")
    state = random_inception_state()
    state["Mixed_6b.branch7x7_2.conv.weight"] = state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3)
    torch.save(state, bad_inception)
    base[3] = bad_inception
    assert "mis-shaped" in error("--data", good)
    base[3] = str(tmp_path / "missing.pth")
    assert "--inception" in error("--data", good)
    base[3], base[5] = weights[0], str(tmp_path / "no_clip")
    assert "--clip" in error("--data", good)
    base[5], base[1] = weights[1], str(tmp_path)
    assert "smartbrush.json" in error("--data", good)
