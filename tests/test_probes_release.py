"""Release files and folders that are wrong in ways a loader must say (issue 36): weights
that are NaN/inf or integers, keys of two families or of no component (a LoRA's), an
upper-case extension, a VAE of another family, a config value of the wrong type, a beta
schedule we do not know (and the cosine one, which we do), and an export whose bytes
changed after it was written. Each is a one-line `error: ...` and exit 2, never a
traceback and never a silent garbage model."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sd_fixtures import state_dict_numpy, write_sd2_folder, write_sdxl_folder

from smartbrush_jax.interop import ldm_keys
from smartbrush_jax.interop.weights import WeightsError
from smartbrush_jax.models import UNetConfig, VAEConfig

UNET_CONV_IN = ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight"
LORA_KEYS = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha")


# ---------------------------------------------------------------------------- helpers
def _release_state(models, family="sd1"):
    """The single-file (CompVis / Stability) layout of a tiny pipeline's models."""
    text2 = state_dict_numpy(models["text_encoder_2"]) if family == "sdxl" else None
    return ldm_keys.diffusers_to_ldm(
        state_dict_numpy(models["unet"]), state_dict_numpy(models["vae"]), state_dict_numpy(models["text_encoder"]),
        UNetConfig.from_diffusers(dict(models["unet"].config)), VAEConfig.from_diffusers(dict(models["vae"].config)),
        family, text2)


def _save(state, path):
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, str(path))
    return str(path)


def _one_error(err, *words):
    """stderr holds exactly one `error: ...` line, the last, naming every word; no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _convert(capsys, ckpt, folder, out, *extra):
    from smartbrush_jax.cli.convert import main

    capsys.readouterr()
    rc = main(["--ckpt", str(ckpt), "--tokenizer", os.path.join(folder, "tokenizer"), "--out", str(out),
               "--configs-from", folder, *extra])
    return rc, capsys.readouterr().err


def _inpaint(capsys, checkpoint, tmp_path):
    from smartbrush_jax.cli.inpaint import main

    image = tmp_path / "in.png"
    if not image.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    out = tmp_path / f"out_{time.monotonic_ns()}"
    capsys.readouterr()
    rc = main(["--checkpoint", str(checkpoint), "--image", str(image), "--box", "4,4,28,28", "--prompt", "the cat",
               "--steps", "2", "--resolution", "32", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 2 or not out.exists()
    return rc, err


@pytest.fixture(scope="module")
def v1_release(sd_folder, tmp_path_factory):
    """The tiny SD v1 folder's models as a release-layout .safetensors (and that state)."""
    folder, models = sd_folder
    state = _release_state(models)
    path = _save(state, tmp_path_factory.mktemp("v1_release") / "sd-tiny.safetensors")
    return {"folder": folder, "path": path, "state": state}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl") / "folder")
    return folder, write_sdxl_folder(folder)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd2") / "folder")
    return folder, write_sd2_folder(folder, prediction_type="epsilon")


# ---------------------------------------------------------------------------- 1, 2: values and dtypes
@pytest.mark.timeout(600)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_convert_refuses_non_finite_unet_weights(v1_release, tmp_path, capsys, bad):
    state = dict(v1_release["state"])
    w = np.array(state[UNET_CONV_IN])
    w[0, 0, 1, 1] = bad
    state[UNET_CONV_IN] = w
    ckpt = _save(state, tmp_path / "nan.safetensors")
    rc, err = _convert(capsys, ckpt, v1_release["folder"], tmp_path / "out")
    assert rc == 2 and not (tmp_path / "out").exists()
    _one_error(err, "nan.safetensors", UNET_CONV_IN, "NaN or inf")


@pytest.mark.timeout(600)
def test_convert_refuses_integer_weights_but_keeps_position_ids(v1_release, tmp_path, capsys):
    state = dict(v1_release["state"])
    state[UNET_CONV_IN] = np.round(state[UNET_CONV_IN] * 100).astype(np.int64)
    ckpt = _save(state, tmp_path / "int.safetensors")
    rc, err = _convert(capsys, ckpt, v1_release["folder"], tmp_path / "out")
    assert rc == 2 and not (tmp_path / "out").exists()
    _one_error(err, "int.safetensors", UNET_CONV_IN, "int64")
    # what the SD v1 releases hold: CLIP's int64 position_ids buffer (and model_ema.num_updates)
    state = dict(v1_release["state"])
    state[ldm_keys.TEXT_PREFIX + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    state["model_ema.num_updates"] = np.array(470000, np.int32)
    state["alphas_cumprod"] = np.linspace(0.999, 0.005, 1000).astype(np.float32)  # LDM's schedule buffers
    ckpt = _save(state, tmp_path / "release_like.safetensors")
    rc, err = _convert(capsys, ckpt, v1_release["folder"], tmp_path / "ok")
    assert rc == 0, err[-2000:]


# ---------------------------------------------------------------------------- 3: two families in one file
@pytest.mark.timeout(900)
def test_convert_refuses_keys_of_two_families(sdxl_folder, sd2_folder, tmp_path, capsys):
    xl_dir, xl_models = sdxl_folder
    state = _release_state(xl_models, "sdxl")
    v1_key = ldm_keys.TEXT_PREFIX + "final_layer_norm.weight"
    state[v1_key] = np.ones(16, np.float32)
    rc, err = _convert(capsys, _save(state, tmp_path / "xl_v1.safetensors"), xl_dir, tmp_path / "o1")
    assert rc == 2 and not (tmp_path / "o1").exists()
    _one_error(err, "xl_v1.safetensors", "sd1", "sdxl", v1_key, "conditioner.embedders.")

    sd2_dir, sd2_models = sd2_folder
    state = _release_state(sd2_models, "sd2")
    clip_l_key = ldm_keys.SDXL_TEXT_PREFIX + "final_layer_norm.weight"
    state[clip_l_key] = np.ones(16, np.float32)
    rc, err = _convert(capsys, _save(state, tmp_path / "sd2_xl.safetensors"), sd2_dir, tmp_path / "o2",
                       "--prediction-type", "epsilon")
    assert rc == 2 and not (tmp_path / "o2").exists()
    line = _one_error(err, "sd2_xl.safetensors", "sd2", "sdxl", clip_l_key, ldm_keys.SD2_TEXT_PREFIX)
    assert "more than one" in line


# ---------------------------------------------------------------------------- 4: keys of no component
@pytest.mark.timeout(600)
def test_convert_refuses_stray_lora_keys_unless_asked_to_drop_them(v1_release, tmp_path, capsys):
    from smartbrush_jax.interop.loader import load_diffusers_folder, load_single_file, read_configs

    state = dict(v1_release["state"])
    state.update({k: np.full(() if k.endswith(".alpha") else (4, 4), 0.5, np.float32) for k in LORA_KEYS})
    ckpt = _save(state, tmp_path / "with_lora.safetensors")
    rc, err = _convert(capsys, ckpt, v1_release["folder"], tmp_path / "out")
    assert rc == 2 and not (tmp_path / "out").exists()
    _one_error(err, "with_lora.safetensors", "3 key(s)", LORA_KEYS[0], "--ignore-extra-keys")

    rc, err = _convert(capsys, ckpt, v1_release["folder"], tmp_path / "out", "--ignore-extra-keys")
    assert rc == 0, err[-2000:]
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "dropped 3 key(s)" in warning[0] and LORA_KEYS[0] in warning[0], err
    back = load_diffusers_folder(str(tmp_path / "out"))
    assert back.unet_params["conv_in"]["kernel"].shape[2] == 4
    # the same keyword in the Python API
    with pytest.raises(WeightsError, match=r"3 key\(s\) outside every component"):
        load_single_file(ckpt, **read_configs(v1_release["folder"]))
    load_single_file(ckpt, ignore_extra_keys=True, **read_configs(v1_release["folder"]))


# ---------------------------------------------------------------------------- 5: upper-case extension
@pytest.mark.timeout(600)
def test_upper_case_safetensors_extension_is_read(v1_release, tmp_path, capsys):
    from smartbrush_jax.interop.weights import read_state_dict

    upper = tmp_path / "MODEL.SAFETENSORS"
    shutil.copy(v1_release["path"], upper)
    assert set(read_state_dict(str(upper))) == set(v1_release["state"])
    rc, err = _convert(capsys, upper, v1_release["folder"], tmp_path / "out")
    assert rc == 0, err[-2000:]


# ---------------------------------------------------------------------------- 6: a VAE of another family
@pytest.mark.timeout(900)
def test_inpaint_refuses_a_folder_whose_vae_is_another_familys(sdxl_folder, sd2_folder, tmp_path, capsys):
    for (src, _), family, scaling, want in ((sdxl_folder, "sdxl", 0.18215, 0.13025),
                                            (sd2_folder, "sd2", 0.13025, 0.18215)):
        folder = tmp_path / family
        shutil.copytree(src, folder)
        cfg_path = folder / "vae" / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "scaling_factor": scaling}))
        rc, err = _inpaint(capsys, folder, tmp_path)
        assert rc == 2
        _one_error(err, str(folder), f"scaling_factor {scaling}", f"this U-Net is {family} ({want})")


# ---------------------------------------------------------------------------- 7: NaN in a folder
@pytest.mark.timeout(600)
def test_folder_with_a_nan_unet_weight_is_refused(sd_folder, tmp_path, capsys):
    from smartbrush_jax.interop.loader import load_diffusers_folder

    folder = tmp_path / "nan_unet"
    shutil.copytree(sd_folder[0], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_in.weight"] = torch.full_like(state["conv_in.weight"], float("nan"))
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match=r"unet.*'conv_in\.weight'.*NaN or inf"):
        load_diffusers_folder(str(folder), components=("unet",))
    rc, err = _inpaint(capsys, folder, tmp_path)
    assert rc == 2
    _one_error(err, "unet", "conv_in.weight", "NaN or inf")


# ---------------------------------------------------------------------------- 8: config of the wrong type
@pytest.mark.timeout(600)
@pytest.mark.parametrize("component,field,value", [("unet", "block_out_channels", "abc"),
                                                   ("unet", "layers_per_block", "two"),
                                                   ("vae", "scaling_factor", [1]),
                                                   ("text_encoder", "hidden_size", "wide")])
def test_config_value_of_the_wrong_type_is_one_line(sd_folder, tmp_path, capsys, component, field, value):
    from smartbrush_jax.interop.loader import load_diffusers_folder

    folder = tmp_path / "bad_config"
    shutil.copytree(sd_folder[0], folder)
    cfg_path = folder / component / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), field: value}))
    name = os.path.join(component, "config.json")
    with pytest.raises(WeightsError, match=f"{name}.*{field}"):
        load_diffusers_folder(str(folder))
    rc, err = _inpaint(capsys, folder, tmp_path)
    assert rc == 2
    _one_error(err, name, field)


# ---------------------------------------------------------------------------- 9: beta schedules
@pytest.mark.timeout(300)
def test_cosine_beta_schedule_equals_diffusers():
    from diffusers import DDIMScheduler

    from smartbrush_jax.diffusion import NoiseSchedule

    for n in (1000, 50):
        ours = NoiseSchedule.from_diffusers({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": n})
        ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=n)
        np.testing.assert_allclose(ours.betas(), ref.betas.double().numpy(), rtol=1e-6, atol=0)
        assert ours.betas().max() == pytest.approx(0.999)  # capped as diffusers caps it
        np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match=r"beta_schedule 'sigmoid' is not supported \(linear, scaled_linear, "
                                         r"squaredcos_cap_v2\)"):
        NoiseSchedule.from_diffusers({"beta_schedule": "sigmoid"})


@pytest.mark.timeout(600)
def test_folder_with_an_unknown_beta_schedule_is_one_line(sd_folder, tmp_path, capsys):
    from smartbrush_jax.interop.loader import load_diffusers_folder

    folder = tmp_path / "odd_schedule"
    shutil.copytree(sd_folder[0], folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "beta_schedule": "squaredcos_cap_v2"}))
    sd = load_diffusers_folder(str(folder), components=("unet",))  # the cosine schedule loads
    assert sd.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    cfg_path.write_text(json.dumps({**cfg, "beta_schedule": "exponential"}))
    rc, err = _inpaint(capsys, folder, tmp_path)
    assert rc == 2
    _one_error(err, "scheduler_config.json", "'exponential'", "linear, scaled_linear, squaredcos_cap_v2")


# ---------------------------------------------------------------------------- 10: export checksums
@pytest.fixture(scope="module")
def tiny_export(sd_folder, tmp_path_factory):
    """A latent-space SmartBrush from the tiny SD (as tests/test_export.py's latent_export),
    exported as `smartbrush-export` writes (`export_workdir`: `building` then `write_export`)."""
    from smartbrush_jax.interop.export import _settings, write_export
    from smartbrush_jax.interop.loader import load_diffusers_folder, to_smartbrush
    from smartbrush_jax.outputs import building

    sd = to_smartbrush(load_diffusers_folder(sd_folder[0]), 10)
    path = str(tmp_path_factory.mktemp("export") / "model")
    with building(path) as tmp:
        write_export(sd, tmp, _settings({"num_levels": 10, "autoencoder": "vae"}, path, 0, True))
    return path


@pytest.mark.timeout(900)
def test_export_checksums_catch_a_changed_weights_file(tiny_export, tmp_path, capsys):
    import hashlib

    from smartbrush_jax.interop.loader import load_diffusers_folder
    from smartbrush_jax.pytorch import PipelineError, SmartBrushPipeline

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    sums = json.loads((folder / "smartbrush.json").read_text())["checksums"]
    written = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                     for d, _, fs in os.walk(folder) for f in fs if f != "smartbrush.json")
    assert sorted(sums) == written and "unet/diffusion_pytorch_model.safetensors" in sums
    for name, digest in sums.items():
        assert digest == "sha256:" + hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    load_diffusers_folder(str(folder))  # intact: loads
    SmartBrushPipeline.from_pretrained(str(folder))

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # a few bytes in the middle of the tensor data, size unchanged
        f.seek(size // 2)
        good = f.read(3)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x10 for b in good))
    assert weights.stat().st_size == size
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.safetensors: sha256 .* does not match"):
        load_diffusers_folder(str(folder))
    rc, err = _inpaint(capsys, folder, tmp_path)
    assert rc == 2
    _one_error(err, "unet/diffusion_pytorch_model.safetensors", "sha256")
    with pytest.raises(PipelineError, match=r"unet/diffusion_pytorch_model\.safetensors: sha256 .* does not match"):
        SmartBrushPipeline.from_pretrained(str(folder))

    # a plain diffusers folder (no smartbrush.json checksums) loads as before
    plain = tmp_path / "plain"
    shutil.copytree(tiny_export, plain)
    settings = json.loads((plain / "smartbrush.json").read_text())
    del settings["checksums"]
    (plain / "smartbrush.json").write_text(json.dumps(settings))
    shutil.copy(weights, plain / "unet" / "diffusion_pytorch_model.safetensors")
    load_diffusers_folder(str(plain), components=("unet",))
