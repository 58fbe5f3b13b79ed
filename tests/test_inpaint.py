"""The `inpaint` command end to end on a tiny random SD folder, and its bad-input handling."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from smartbrush_jax.cli.inpaint import main
from smartbrush_jax.compositing import working_size
from smartbrush_jax.interop.loader import load_diffusers_folder, to_smartbrush
from smartbrush_jax.sampling.runner import Inpainter
from smartbrush_jax.settings import SamplerConfig

H, W = 50, 70


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inpaint_inputs")
    rng = np.random.default_rng(0)
    img = (rng.uniform(size=(H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "img.png")
    m = np.zeros((H, W), np.uint8)
    m[10:30, 20:50] = 255
    Image.fromarray(m).save(d / "mask.png")
    return d, img, m > 0


def _read(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("sampler", [[], ["--sampler", "dpm++2m", "--karras"]], ids=["ddim", "dpm++2m_karras"])
def test_cli_keeps_every_background_pixel(sd_folder, files, tmp_path, sampler):
    d, img, mask = files
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "smartbrush_jax.inpaint", "--checkpoint", sd_folder[0], "--image", str(d / "img.png"),
         "--mask", str(d / "mask.png"), "--prompt", "a cat", "--steps", "4", "--seed", "3", "--out", str(out),
         *sampler], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    for name in ("result.png", "predicted_mask.png", "grid.png"):
        assert str(out / name) in printed
    result = _read(out / "result.png")
    assert result.shape == img.shape
    np.testing.assert_array_equal(result[~mask], img[~mask])  # byte-identical background
    assert (result[mask] != img[mask]).mean() > 0.5  # and the region was repainted
    pred = _read(out / "predicted_mask.png") > 127
    assert not (pred & ~mask).any()
    assert _read(out / "grid.png").shape == (H, 3 * W, 3)
    assert "sampling    4/4" in proc.stderr  # progress over the steps


def test_cli_is_deterministic_for_a_seed(sd_folder, files, tmp_path):
    d = files[0]
    common = ["--checkpoint", sd_folder[0], "--image", str(d / "img.png"), "--box", "5,5,40,30",
              "--prompt", "a cat", "--steps", "3", "--num-samples", "2"]
    assert main(common + ["--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(common + ["--seed", "2", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (_read(tmp_path / x / "result.png") for x in "abc")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    assert os.path.isfile(tmp_path / "a" / "result_1.png")  # the second sample


class _PlantedUNet:
    """A U-Net stand-in whose mask logit is positive only on a planted latent region."""

    def __init__(self, region):
        self.region = region

    def apply(self, variables, x, t, context, levels):
        eps = jnp.tanh(x[..., :4])
        logit = jnp.broadcast_to(jnp.where(self.region, 10.0, -10.0)[None, ..., None], x.shape[:3] + (1,))
        return jnp.concatenate([eps, logit], -1)


def test_box_pixels_outside_the_predicted_mask_are_restored(sd_folder, files):
    _, img, _ = files
    sd = to_smartbrush(load_diffusers_folder(sd_folder[0]), 10)
    inpainter = Inpainter(sd)
    box = np.zeros((H, W), bool)
    box[8:40, 8:64] = True
    wh, ww = working_size(H, W, 512, inpainter.size_multiple)
    f = inpainter.vae_factor
    planted = np.zeros((wh // f, ww // f), bool)
    planted[6:14, 6:14] = True  # the left part of the box on the latent grid
    inpainter.unet = _PlantedUNet(planted)
    result = inpainter(img, box, "a cat", precision=10, sampler=SamplerConfig(num_steps=4, mask_dilate=0),
                       feather=0.0)
    pred = result.predicted_masks[0]
    assert pred.any() and (pred & ~box).sum() == 0 and pred.sum() < box.sum() / 2
    out = result.images[0]
    restored = box & ~pred
    np.testing.assert_array_equal(out[restored], img[restored])
    np.testing.assert_array_equal(out[~box], img[~box])
    assert (out[pred] != img[pred]).mean() > 0.5


# ---------------------------------------------------------------------------- bad input
def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def _base(sd_folder, d):
    return ["--checkpoint", sd_folder[0], "--image", str(d / "img.png"), "--prompt", "a cat", "--steps", "2"]


def test_missing_and_unreadable_image(sd_folder, files, tmp_path, capsys):
    d = files[0]
    code, err = _run(capsys, ["--checkpoint", sd_folder[0], "--image", str(tmp_path / "none.png"),
                              "--mask", str(d / "mask.png"), "--prompt", "x"])
    assert code == 2 and "none.png: no such file" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    code, err = _run(capsys, ["--checkpoint", sd_folder[0], "--image", str(bad), "--mask", str(d / "mask.png"),
                              "--prompt", "x"])
    assert code == 2 and "cannot read the image" in err


def test_empty_mask_box_outside_and_bad_box(sd_folder, files, tmp_path, capsys):
    d = files[0]
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty.png")
    code, err = _run(capsys, _base(sd_folder, d) + ["--mask", str(tmp_path / "empty.png")])
    assert code == 2 and "the mask is empty" in err
    code, err = _run(capsys, _base(sd_folder, d) + ["--box", "100,100,120,130"])
    assert code == 2 and "lies outside the 70x50 image" in err
    code, err = _run(capsys, _base(sd_folder, d) + ["--box", "1,2,3"])
    assert code == 2 and "expected four integers" in err


def test_precision_out_of_range(sd_folder, files, capsys):
    d = files[0]
    code, err = _run(capsys, _base(sd_folder, d) + ["--mask", str(d / "mask.png"), "--precision", "11"])
    assert code == 2 and "--precision must be in [0, 10]" in err


def test_sampler_options_that_do_not_go_together(sd_folder, files, capsys):
    d = files[0]
    base = _base(sd_folder, d) + ["--mask", str(d / "mask.png")]
    code, err = _run(capsys, base + ["--karras"])
    assert code == 2 and "--karras is an option of dpm++2m and euler, not of ddim" in err
    code, err = _run(capsys, base + ["--sampler", "euler", "--eta", "0.5"])
    assert code == 2 and "--eta is DDIM's; euler takes none" in err


def test_bad_checkpoint(files, tmp_path, capsys):
    d = files[0]
    code, err = _run(capsys, ["--checkpoint", str(tmp_path / "nope"), "--image", str(d / "img.png"),
                              "--mask", str(d / "mask.png"), "--prompt", "x"])
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "empty_dir").mkdir()
    code, err = _run(capsys, ["--checkpoint", str(tmp_path / "empty_dir"), "--image", str(d / "img.png"),
                              "--mask", str(d / "mask.png"), "--prompt", "x"])
    assert code == 2 and "no model_index.json" in err
    (tmp_path / "sd.ckpt").write_bytes(b"x")
    code, err = _run(capsys, ["--checkpoint", str(tmp_path / "sd.ckpt"), "--image", str(d / "img.png"),
                              "--mask", str(d / "mask.png"), "--prompt", "x"])
    assert code == 2 and "pass --tokenizer DIR" in err


def test_resized_non_binary_mask_and_long_prompt_warn_and_run(sd_folder, files, tmp_path, capsys):
    d, img, _ = files
    m = np.zeros((25, 35), np.uint8)  # half the image size
    m[5:15, 10:25] = 255
    m[5:15, 10] = 100  # not binary
    Image.fromarray(m).save(tmp_path / "small.png")
    long_prompt = " ".join(["cat"] * 100)
    code, err = _run(capsys, ["--checkpoint", sd_folder[0], "--image", str(d / "img.png"), "--prompt", long_prompt,
                              "--steps", "2", "--mask", str(tmp_path / "small.png"), "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert "resized (nearest neighbour)" in err
    assert "not binary" in err and "thresholded at 0.5" in err
    assert "longer than 77 tokens and was truncated" in err
    expected = np.asarray(Image.fromarray(m).resize((W, H), Image.Resampling.NEAREST)) > 127
    result = _read(tmp_path / "o" / "result.png")
    np.testing.assert_array_equal(result[~expected], img[~expected])
