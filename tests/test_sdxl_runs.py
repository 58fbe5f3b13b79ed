"""SmartBrush on an SDXL base, through the whole system as a user runs it: a tiny SDXL
pipeline folder written by diffusers' own StableDiffusionXLPipeline (two text encoders,
micro-conditioning) trains on this CPU, resumes, exports, loads in stock diffusers, inpaints
with the background untouched, runs in the PyTorch pipeline and is scored by eval/fid.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import rel_err, write_sdxl_folder
from train_helpers import inpaint_keeps_the_background, read, train

RES = 32  # pixels; the tiny VAE halves it, the 2-level U-Net runs at 16 and 8


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from smartbrush_jax.cli.export import main as export

    root = tmp_path_factory.mktemp("sdxl")
    folder, work, out = str(root / "sdxl-base"), str(root / "run"), str(root / "export")
    torch_models = write_sdxl_folder(folder)
    common = [f"--config.model.init_from={folder}", "--config.model.family=sdxl", "--config.model.autoencoder=vae",
              f"--config.data.resolution={RES}", f"--config.data.synthetic_size={RES}",
              "--config.train.batch_size=2", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
    first = train(work, *common, "--config.train.steps=2", timeout=420)
    assert first.returncode == 0, first.stderr[-3000:]
    # the resumed run draws the held-out grid at step 3 (both encoders, micro-conditioning)
    second = train(work, *common, "--config.train.steps=3", "--config.train.sample_every=3",
                   "--config.train.sample_steps=2", timeout=420)
    assert second.returncode == 0, second.stderr[-3000:]
    assert export(["--workdir", work, "--out", out]) == 0
    return {"work": work, "torch": torch_models, "logs": (first.stderr, second.stderr), "export": out}


@pytest.mark.slow  # two trainer runs and an export of a two-encoder model: ~2-3 min on 2 shared cores
@pytest.mark.timeout(1200)
def test_sdxl_trains_resumes_exports_and_loads_in_stock_diffusers(sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    from smartbrush_jax.interop.loader import load_workdir
    from smartbrush_jax.models.conditioning import TextEncoders, plain_micro, unet_apply

    first, second = sdxl_run["logs"]
    assert "resumed from step 2" in second and "resumed" not in first
    summary = json.loads(read(os.path.join(sdxl_run["work"], "summary.json")))
    assert summary["steps"] == 3 and all(np.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    model = json.loads(read(os.path.join(sdxl_run["work"], "model.json")))
    assert model["family"] == "sdxl" and model["text2"]["projection_dim"] == 16
    assert model["unet"]["addition_embed_type"] == "text_time" and model["unet"]["in_channels"] == 5
    grid = np.asarray(Image.open(os.path.join(sdxl_run["work"], "samples", "step_0000003.png")))
    assert grid.ndim == 3 and grid.std() > 0

    assert json.loads(read(os.path.join(sdxl_run["export"], "smartbrush.json")))["family"] == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_run["export"], local_files_only=True)
    assert pipe.text_encoder_2.config.projection_dim == 16 and pipe.unet.config.num_class_embeds == 11
    # the exported second encoder is the base's, through our writer's key names
    base2 = sdxl_run["torch"]["text_encoder_2"].state_dict()
    for k, v in pipe.text_encoder_2.state_dict().items():
        assert torch.equal(v, base2[k]), k

    # diffusers' own SDXL prompt encoding (both encoders, penultimate states, pooled) and
    # U-Net equal ours on the trained weights
    step, sd = load_workdir(sdxl_run["work"])
    assert step == 3
    prompt = "a red star"
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    ids = sd.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids.astype(np.int32)
    enc = TextEncoders(sd.text_encoder(), sd.text_encoder_2(), sd.tokenizer.eos_token_id, sd.tokenizer_2.pad_token_id)
    micro = plain_micro(RES, RES)[None]
    ctx = enc({"text": sd.text_params, "text2": sd.text2_params}, ids, micro)
    assert rel_err(ctx["hidden"], embeds.numpy()) <= 1e-5 and rel_err(ctx["pooled"], pooled.numpy()) <= 1e-5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, RES // 2, RES // 2, 5)).astype(np.float32)
    t, levels = np.array([500], np.int32), np.array([7], np.int32)
    ours = np.asarray(unet_apply(sd.unet(), sd.unet_params, x, t, ctx, levels))
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(), embeds,
                        class_labels=torch.from_numpy(levels).long(),
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.from_numpy(micro).float()}
                        ).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(ours, ref) <= 1e-5
    base = sdxl_run["torch"]["unet"].state_dict()["conv_in.weight"].numpy()
    assert not np.allclose(pipe.unet.state_dict()["conv_in.weight"].numpy()[:, :4], base, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sdxl_export_inpaints_with_the_background_untouched(sdxl_run, tmp_path):
    inpaint_keeps_the_background(sdxl_run["export"], tmp_path, seed=6, shape=(36, 40), box=(4, 4, 30, 28),
                                 resolution=RES, args=("--prompt", "the cat", "--precision", "2", "--sampler", "euler"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sdxl_pytorch_pipeline_matches_jax_inpainter(sdxl_run):
    """The PyTorch pipeline on the SDXL export (both encoders, pooled embedding, micro-
    conditioning through diffusers' U-Net) inpaints what our Inpainter inpaints."""
    import jax

    from smartbrush_jax.interop.loader import load_workdir
    from smartbrush_jax.pytorch import SmartBrushPipeline
    from smartbrush_jax.sampling.runner import Inpainter
    from smartbrush_jax.settings import SamplerConfig

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[8:30, 12:34] = True
    cfg = SamplerConfig(num_steps=4, guidance_scale=3.0, sampler="dpm++2m")
    ours = Inpainter(load_workdir(sdxl_run["work"])[1])(image, mask, "a red circle", precision=5, seed=3,
                                                         resolution=RES, feather=1.0, sampler=cfg)
    pipe = SmartBrushPipeline.from_pretrained(sdxl_run["export"])
    assert pipe.sdxl and pipe.text_encoder_2 is not None
    noise = np.array(jax.random.normal(jax.random.split(jax.random.PRNGKey(3))[0], (1, RES // 2, RES // 2, 4)))
    ref = pipe(image, mask, "a red circle", precision=5, resolution=RES, feather=1.0, sampler=cfg,
               noise=torch.from_numpy(noise).permute(0, 3, 1, 2))
    assert ref.working_size == ours.working_size == (RES, RES)
    assert (ref.images[0][~mask] == image[~mask]).all()
    assert np.abs(ref.images.astype(int) - ours.images.astype(int)).max() <= 1
    assert ((ref.predicted_masks > 0.5) == (ours.predicted_masks > 0.5)).mean() >= 0.99
    # without its second encoder the SDXL U-Net is refused, in words
    from smartbrush_jax.pytorch import PipelineError

    with pytest.raises(PipelineError, match="needs text_encoder_2 and tokenizer_2"):
        SmartBrushPipeline(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae, pipe.settings)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_scores_an_sdxl_export(sdxl_run, tmp_path):
    """eval/fid.py on the SDXL export (through the PyTorch pipeline's two encoders), with
    random Inception and CLIP weights saved to local files: every score finite, the
    background of every generation untouched."""
    import csv
    import importlib.util

    from metrics_fixtures import random_inception_state, write_tiny_clip

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("eval_fid", os.path.join(root, "eval", "fid.py"))
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    inception = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(random_inception_state(), inception)
    clip = str(tmp_path / "clip")
    os.makedirs(clip)
    write_tiny_clip(clip, ["red star", "blue circle"])
    rng = np.random.default_rng(7)
    rows, masks = [], {}
    for i, prompt in enumerate(("a red star", "a blue circle")):
        img = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
        mask = np.zeros((36, 40), np.uint8)
        mask[6 + i:26, 8:30 - i] = 255
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        rows.append((f"{i}.png", f"{i}_mask.png", prompt))
        masks[i] = (img, mask > 0)
    with open(tmp_path / "set.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "mask", "prompt"), *rows])
    out = str(tmp_path / "eval")
    assert fid.main(["--model", sdxl_run["export"], "--data", str(tmp_path / "set.csv"), "--inception", inception,
                     "--clip", clip, "--out", out, "--steps", "2", "--examples", "2"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["num_items"] == 2
    for m in results["metrics"].values():
        assert np.isfinite([m["fid"], m["local_fid"], m["clip"]]).all()
    gen_dir = os.path.join(out, "generated", "accurate")
    for name in sorted(os.listdir(gen_dir)):
        if not name.endswith("_mask.png"):
            img, mask = masks[int(name.split(".")[0])]  # items are keyed by their row: 000000, 000001
            gen = np.asarray(Image.open(os.path.join(gen_dir, name)).convert("RGB"))
            assert (gen[~mask] == img[~mask]).all()
