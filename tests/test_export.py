"""Export to a diffusers folder and the PyTorch SmartBrush pipeline: the exported models in
stock diffusers/transformers reproduce ours, the PyTorch sampler reproduces the JAX one,
the pipeline runs without JAX, and bad input gets exit code 2."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import rel_err

from smartbrush_jax.cli.export import main
from smartbrush_jax.diffusion import NoiseSchedule
from smartbrush_jax.interop.export import _settings, write_export
from smartbrush_jax.interop.loader import load_diffusers_folder, load_workdir, to_smartbrush
from smartbrush_jax.pytorch import PipelineError, SmartBrushPipeline
from smartbrush_jax.sampling.sampler import plan_for, sample
from smartbrush_jax.settings import SamplerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)


def test_export_loads_in_stock_diffusers_and_matches(demo_run, demo_export):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    files = [os.path.relpath(os.path.join(d, f), demo_export) for d, _, fs in os.walk(demo_export) for f in fs]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack"))]
    assert sorted(weights) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    assert not any(f.startswith("vae/") for f in files)  # the demo runs in pixel space
    settings = json.load(open(os.path.join(demo_export, "smartbrush.json")))
    assert settings["num_levels"] == 10 and settings["autoencoder"] == "identity" and settings["resolution"] == 32
    assert settings["source"]["step"] == 4 and settings["source"]["ema"] is True

    step, sd = load_workdir(demo_run)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(demo_export, "unet"), local_files_only=True).eval()
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.num_class_embeds) == (4, 4, 11)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 32, 32, 4)).astype(np.float32)
    ctx = rng.standard_normal((3, 77, 64)).astype(np.float32)
    t, levels = np.array([1, 480, 999], np.int32), np.array([0, 5, 10], np.int32)
    ours = np.asarray(sd.unet().apply({"params": sd.unet_params}, x, t, ctx, levels))
    with torch.no_grad():
        ref = unet(_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                   class_labels=torch.from_numpy(levels).long()).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(ours, ref) <= 1e-5

    text = CLIPTextModel.from_pretrained(os.path.join(demo_export, "text_encoder"), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(demo_export, "tokenizer"), local_files_only=True)
    ids = tok(["a red circle", ""], padding="max_length", max_length=77, return_tensors="np").input_ids
    assert (ids == sd.tokenizer(["a red circle", ""], padding="max_length", max_length=77,
                                return_tensors="np").input_ids).all()
    with torch.no_grad():
        ref_h = text(torch.from_numpy(ids))[0].numpy()
    assert rel_err(np.asarray(sd.text_encoder().apply({"params": sd.text_params}, ids)[0]), ref_h) <= 1e-5

    sched = DDIMScheduler.from_pretrained(os.path.join(demo_export, "scheduler"), local_files_only=True)
    sched.set_timesteps(10)
    ours_sched = NoiseSchedule.from_diffusers(dict(sched.config))
    assert (sched.timesteps.numpy() == plan_for(ours_sched, SamplerConfig(num_steps=10)).timesteps).all()
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ours_sched.alphas_cumprod(), rtol=1e-5)


def _latent_export(sd_folder, tmp_path_factory, prediction="epsilon"):
    """A latent-space SmartBrush (tiny random SD + channel surgery, weights perturbed and
    the mask logit's bias set so about 10% of cells are positive), exported."""
    sd = to_smartbrush(load_diffusers_folder(sd_folder[0]), 10)
    sd.scheduler_config = {**sd.scheduler_config, "prediction_type": prediction}
    rng = np.random.default_rng(0)
    leaves, tdef = jax.tree_util.tree_flatten(sd.unet_params)
    sd.unet_params = jax.tree_util.tree_unflatten(
        tdef, [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
    x0, mask = rng.standard_normal((2, 16, 16, 4)).astype(np.float32), _box_mask(2, 16)
    out = np.asarray(sd.unet().apply({"params": sd.unet_params}, np.concatenate([x0, mask[..., None]], -1),
                                     np.array([500, 500]), rng.standard_normal((2, 77, 32)).astype(np.float32),
                                     np.array([0, 7])))
    bias = np.array(sd.unet_params["conv_out"]["bias"])
    bias[4] -= np.percentile(out[..., 4][mask > 0], 90)
    sd.unet_params["conv_out"]["bias"] = jnp.asarray(bias)
    path = str(tmp_path_factory.mktemp("latent_export") / "model")
    os.makedirs(path)
    write_export(sd, path, _settings({"num_levels": 10, "autoencoder": "vae"}, path, 0, True))
    return sd, path


@pytest.fixture(scope="module")
def latent_export(sd_folder, tmp_path_factory):
    return _latent_export(sd_folder, tmp_path_factory)


@pytest.fixture(scope="module")
def v_export(sd_folder, tmp_path_factory):
    """The same as a v-prediction model (SD 2.x 768's parameterisation)."""
    return _latent_export(sd_folder, tmp_path_factory, "v_prediction")


def _box_mask(b, n):
    mask = np.zeros((b, n, n), np.float32)
    mask[:, n // 5:n - n // 5, n // 4:n - n // 4] = 1
    return mask


def _iou(a, b):
    a, b = a > 0.5, b > 0.5
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("prediction,sampler,karras", [
    ("epsilon", "ddim", False), ("epsilon", "dpm++2m", False), ("epsilon", "dpm++2m", True),
    ("epsilon", "euler", False), ("v_prediction", "ddim", False), ("v_prediction", "dpm++2m", True)])
def test_pytorch_sampler_matches_jax_sampler(request, prediction, sampler, karras):
    """Our sampler against the PyTorch pipeline's loop on diffusers' own schedulers (built
    from the export's scheduler config: its prediction_type too), the background rule included."""
    sd, path = request.getfixturevalue("latent_export" if prediction == "epsilon" else "v_export")
    pipe = SmartBrushPipeline.from_pretrained(path)
    assert pipe.vae is not None and pipe.num_levels == 10 and pipe.scheduler.config.prediction_type == prediction
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((2, 16, 16, 4)).astype(np.float32) for _ in range(2))
    mask, levels = _box_mask(2, 16), np.array([0, 7], np.int32)
    cond, uncond = (rng.standard_normal((2, 77, 32)).astype(np.float32) for _ in range(2))
    unet = sd.unet()
    apply = lambda p, x, t, c, s: unet.apply({"params": p}, x, t, c, s)  # noqa: E731
    cfg = SamplerConfig(num_steps=10, guidance_scale=7.5, sampler=sampler, karras=karras)
    latents, pred = jax.jit(lambda *a: sample(apply, *a, NoiseSchedule.from_diffusers(sd.scheduler_config), cfg,
                                              init_noise=jnp.asarray(noise)))(
        sd.unet_params, x0, mask, levels, cond, uncond, jax.random.PRNGKey(0))
    ref, ref_pred = pipe.sample(_nchw(x0), torch.from_numpy(mask), torch.from_numpy(levels).long(),
                                torch.from_numpy(cond), torch.from_numpy(uncond), _nchw(noise),
                                cfg)
    pred, ref_pred = np.asarray(pred), ref_pred.numpy()
    assert rel_err(np.asarray(latents), ref.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert _iou(pred, ref_pred) >= 0.99
    share = pred.sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    assert ((share > 0.2) & (share < 0.95)).all(), share  # the predicted mask, not the fallback
    assert (np.asarray(latents)[mask == 0] == x0[mask == 0]).all()  # background kept exactly


def test_pytorch_pipeline_matches_jax_inpainter(demo_run, demo_export):
    from smartbrush_jax.sampling.runner import Inpainter

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[8:30, 12:34] = True
    inpainter = Inpainter(load_workdir(demo_run)[1])
    ours = inpainter(image, mask, "a red circle", precision=5, seed=3, resolution=32, feather=1.0,
                     sampler=SamplerConfig(num_steps=10, guidance_scale=3.0))
    pipe = SmartBrushPipeline.from_pretrained(demo_export)
    noise = jax.random.normal(jax.random.split(jax.random.PRNGKey(3))[0], (1, 32, 32, 3))
    ref = pipe(image, mask, "a red circle", precision=5, resolution=32, feather=1.0, noise=_nchw(np.asarray(noise)),
               sampler=SamplerConfig(num_steps=10, guidance_scale=3.0))
    assert ref.images.shape == (1, 40, 40, 3) and ref.working_size == ours.working_size == (32, 32)
    assert (ref.images[0][~mask] == image[~mask]).all()
    assert np.abs(ref.images.astype(int) - ours.images.astype(int)).max() <= 1
    assert _iou(ref.predicted_masks, ours.predicted_masks) >= 0.99


def test_pytorch_pipeline_runs_without_jax(demo_export, tmp_path):
    """The pipeline is usable where JAX is not installed: every `import jax` fails here."""
    for name in ("jax", "jaxlib", "flax"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    code = (
        "import numpy as np, sys\n"
        "from smartbrush_jax.pytorch import SmartBrushPipeline\nfrom smartbrush_jax.settings import SamplerConfig\n"
        f"pipe = SmartBrushPipeline.from_pretrained({demo_export!r})\n"
        "img = np.full((24, 24, 3), 128, np.uint8); m = np.zeros((24, 24), bool); m[4:20, 6:18] = True\n"
        "r = pipe(img, m, 'a blue square', precision=10, sampler=SamplerConfig(num_steps=2), num_samples=2)\n"
        "assert r.images.shape == (2, 24, 24, 3) and r.predicted_masks.shape == (2, 24, 24)\n"
        "assert not any(k == 'jax' or k.startswith('jax.') for k in sys.modules)\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_export_bad_input_exits_2(demo_run, demo_export, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "model.json").write_text(json.dumps(json.load(open(os.path.join(demo_run, "model.json")))))
    assert main(["--workdir", str(empty), "--out", str(tmp_path / "a")]) == 2
    assert "no checkpoints/ folder" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert main(["--workdir", demo_run, "--out", demo_export]) == 2
    assert "exists" in capsys.readouterr().err

    # model.json that does not describe the checkpoint's U-Net (weights of the wrong shape)
    wrong = tmp_path / "wrong_run"
    wrong.mkdir()
    for name in ("checkpoints", "tokenizer", "frozen_text.safetensors"):
        os.symlink(os.path.join(demo_run, name), wrong / name)
    cfg = json.load(open(os.path.join(demo_run, "model.json")))
    cfg["unet"]["block_out_channels"] = [32, 64, 128]
    (wrong / "model.json").write_text(json.dumps(cfg))
    assert main(["--workdir", str(wrong), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "does not match model.json" in err and not os.path.exists(tmp_path / "c")

    with pytest.raises(PipelineError, match="smartbrush.json"):
        SmartBrushPipeline.from_pretrained(os.path.join(demo_export, "unet"))


def test_inpaint_command_runs_an_export(demo_export, tmp_path):
    """The JAX `inpaint` command reads the exported folder back (pixel-space: no vae/)."""
    from smartbrush_jax.cli.inpaint import main as inpaint

    image = np.random.default_rng(4).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    assert inpaint(["--checkpoint", demo_export, "--image", str(tmp_path / "in.png"), "--box", "6,6,30,28",
                    "--prompt", "a blue circle", "--precision", "10", "--steps", "2", "--resolution", "32",
                    "--out", str(tmp_path / "out")]) == 0
    result = np.asarray(Image.open(tmp_path / "out" / "result.png"))
    box = np.zeros((36, 36), bool)
    box[6:28, 6:30] = True
    assert result.shape == image.shape and (result[~box] == image[~box]).all()
