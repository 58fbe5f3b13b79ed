"""SmartBrush on an SD 2.x base, through the whole system as a user runs it: a tiny
v-prediction pipeline folder written by diffusers itself trains on this CPU, resumes,
exports, loads in stock diffusers, and inpaints with the background untouched (SDXL:
test_sdxl_runs.py, a file of its own so the two long fixtures run on both cores)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sd_fixtures import TINY_UNET_V2, rel_err, write_sd2_folder
from train_helpers import inpaint_keeps_the_background, read, train

RES = 32  # pixels; the tiny VAE halves it, the 3-level U-Net runs at 16, 8 and 4


@pytest.fixture(scope="module")
def sd2_run(tmp_path_factory):
    from smartbrush_jax.cli.export import main as export

    root = tmp_path_factory.mktemp("sd2")
    folder, work = str(root / "sd2-base"), str(root / "run")
    torch_models = write_sd2_folder(folder)
    common = [f"--config.model.init_from={folder}", "--config.model.autoencoder=vae",
              f"--config.data.resolution={RES}", f"--config.data.synthetic_size={RES}",
              "--config.train.batch_size=2", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
    first = train(work, *common, "--config.train.steps=2", timeout=420)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(work, *common, "--config.train.steps=3", timeout=420)
    assert second.returncode == 0, second.stderr[-3000:]
    out = str(root / "export")
    assert export(["--workdir", work, "--out", out]) == 0
    return {"folder": folder, "work": work, "torch": torch_models, "logs": (first.stderr, second.stderr),
            "export": out}


@pytest.mark.slow  # two trainer runs (compile each) and an export: ~2-3 min on 2 shared cores
@pytest.mark.timeout(1200)
def test_sd2_v_prediction_trains_resumes_and_exports(sd2_run):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from smartbrush_jax.interop.loader import load_workdir

    first, second = sd2_run["logs"]
    assert "resumed from step 2" in second and "resumed" not in first
    summary = json.loads(read(os.path.join(sd2_run["work"], "summary.json")))
    assert summary["steps"] == 3
    assert all(np.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    model = json.loads(read(os.path.join(sd2_run["work"], "model.json")))
    assert model["family"] == "sd2" and model["unet"]["use_linear_projection"] is True
    assert model["unet"]["in_channels"] == 5 and model["unet"]["out_channels"] == 5  # latent + mask

    out = sd2_run["export"]
    sched = DDIMScheduler.from_pretrained(os.path.join(out, "scheduler"), local_files_only=True)
    assert sched.config.prediction_type == "v_prediction" and sched.config.steps_offset == 1
    text = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"), local_files_only=True)
    assert text.config.hidden_act == "gelu" and text.config.hidden_size == TINY_UNET_V2["cross_attention_dim"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"), local_files_only=True).eval()
    assert unet.config.use_linear_projection and unet.config.num_class_embeds == 11

    step, sd = load_workdir(sd2_run["work"])  # the checkpoint's EMA weights, which the export holds
    assert step == 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 5)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, TINY_UNET_V2["cross_attention_dim"])).astype(np.float32)
    t, levels = np.array([3, 900], np.int32), np.array([0, 10], np.int32)
    ours = np.asarray(sd.unet().apply({"params": sd.unet_params}, x, t, ctx, levels))
    with torch.no_grad():
        ref = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                   class_labels=torch.from_numpy(levels).long()).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(ours, ref) <= 1e-5
    # training moved the weights away from the base the run started from
    base = sd2_run["torch"]["unet"].state_dict()["conv_in.weight"].numpy()
    assert not np.allclose(unet.state_dict()["conv_in.weight"].numpy()[:, :4], base, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sd2_export_inpaints_with_the_background_untouched(sd2_run, tmp_path):
    inpaint_keeps_the_background(sd2_run["export"], tmp_path, seed=5, shape=(40, 44), box=(8, 6, 36, 30),
                                 resolution=RES,
                                 args=("--prompt", "a red star", "--precision", "4", "--sampler", "dpm++2m"))
