"""Single-file SD 2.x and SDXL releases: files laid out as Stability released them (U-Net and
VAE under CompVis names; SD 2.x's OpenCLIP-H and SDXL's OpenCLIP-bigG in open_clip's names,
with the tensors the releases carry that no encoder uses; SDXL's CLIP-L in transformers'
names), written from tiny random diffusers pipelines. Our names are checked against
diffusers' own single-file converters; loading equals loading the diffusers folder; the
convert command writes a folder stock diffusers loads with the right pipeline class."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sd_fixtures import assert_trees_equal, state_dict_numpy, write_sd2_folder, write_sdxl_folder

from smartbrush_jax.interop import ldm_keys
from smartbrush_jax.interop.loader import folder_components, load_diffusers_folder, load_single_file, read_configs
from smartbrush_jax.interop.weights import WeightsError
from smartbrush_jax.models import UNetConfig, VAEConfig


def _release_file(folder, models, family, path):
    """The release layout of a diffusers folder's models, as Stability's files have it."""
    text2 = state_dict_numpy(models["text_encoder_2"]) if family == "sdxl" else None
    state = ldm_keys.diffusers_to_ldm(
        state_dict_numpy(models["unet"]), state_dict_numpy(models["vae"]), state_dict_numpy(models["text_encoder"]),
        UNetConfig.from_diffusers(dict(models["unet"].config)), VAEConfig.from_diffusers(dict(models["vae"].config)),
        family, text2)
    prefix = ldm_keys.SD2_TEXT_PREFIX if family == "sd2" else ldm_keys.SDXL_TEXT2_PREFIX
    state[prefix + "logit_scale"] = np.float32(4.6) * np.ones((), np.float32)
    if family == "sd2":  # SD 2.x's file holds one more block than the encoder uses, and a projection
        n = models["text_encoder"].config.num_hidden_layers
        last = f"{prefix}transformer.resblocks.{n - 1}."
        for k in [k for k in state if k.startswith(last)]:
            state[k.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.")] = state[k] + 1.0
        width = models["text_encoder"].config.hidden_size
        state[prefix + "text_projection"] = np.ones((width, 8), np.float32)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return state


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def release(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = str(root / "folder")
    models = write_sd2_folder(folder) if request.param == "sd2" else write_sdxl_folder(folder)
    path = str(root / f"{request.param}.safetensors")
    state = _release_file(folder, models, request.param, path)
    return {"family": request.param, "folder": folder, "models": models, "path": path, "state": state}


def test_release_names_agree_with_diffusers_converters(release):
    """diffusers' own converters read our file back into the original state dicts: the U-Net
    (SDXL's text_time embedding under label_emb.0), and the open_clip text towers."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    models, family = release["models"], release["family"]
    tstate = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in release["state"].items()}
    unet = models["unet"]
    got = convert_ldm_unet_checkpoint(tstate, dict(unet.config))
    ref = unet.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k].numpy(), ref[k].numpy(), err_msg=k)
    name, prefix = (("text_encoder", ldm_keys.SD2_TEXT_PREFIX) if family == "sd2"
                    else ("text_encoder_2", ldm_keys.SDXL_TEXT2_PREFIX))
    text = models[name]
    got = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, tstate, prefix).items()}
    ref = {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    assert set(ref) <= set(got)
    for k in ref:
        np.testing.assert_array_equal(got[k].numpy(), ref[k].numpy(), err_msg=k)


def test_single_file_equals_the_folder(release):
    family = release["family"]
    tok = os.path.join(release["folder"], "tokenizer")
    with pytest.raises(WeightsError, match="SD 2.x checkpoint, whose file does not say what it predicts") \
            if family == "sd2" else _nothing():
        load_single_file(release["path"], tokenizer_dir=tok, **read_configs(release["folder"]))
    single = load_single_file(release["path"], tokenizer_dir=tok, prediction_type="v_prediction" if family == "sd2"
                              else None, **read_configs(release["folder"]))
    folder = load_diffusers_folder(release["folder"], components=folder_components(release["folder"]))
    for part in ("unet_params", "vae_params", "text_params") + (("text2_params",) if family == "sdxl" else ()):
        assert_trees_equal(getattr(single, part), getattr(folder, part))
    assert single.scheduler_config["prediction_type"] == folder.scheduler_config["prediction_type"]
    assert single.scheduler_config["steps_offset"] == 1 and single.scheduler_config["timestep_spacing"] == "leading"
    # the OpenCLIP tokenizer is the CLIP one padding with "!", as the folder's
    openclip = single.tokenizer if family == "sd2" else single.tokenizer_2
    assert openclip.convert_ids_to_tokens(openclip.pad_token_id) == "!"
    if family == "sdxl":
        assert single.tokenizer_2.pad_token_id == folder.tokenizer_2.pad_token_id
        assert single.tokenizer.pad_token_id == folder.tokenizer.pad_token_id


def test_a_foreign_key_in_the_text_tower_is_refused(release, tmp_path):
    prefix = ldm_keys.SD2_TEXT_PREFIX if release["family"] == "sd2" else ldm_keys.SDXL_TEXT2_PREFIX
    state = dict(release["state"], **{prefix + "transformer.resblocks.0.attn.extra_weight": np.zeros(3, np.float32)})
    path = str(tmp_path / "odd.safetensors")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    with pytest.raises(WeightsError, match=r"odd.safetensors: 1 key\(s\) the text encoder does not have, "
                                           r"e.g. \['.*resblocks.0.attn.extra_weight'\]"):
        load_single_file(path, prediction_type="epsilon", **read_configs(release["folder"]))


@pytest.mark.timeout(600)
def test_convert_writes_a_folder_stock_diffusers_loads(release, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from smartbrush_jax.cli.convert import main as convert

    family, out = release["family"], str(tmp_path / "converted")
    base = ["--ckpt", release["path"], "--tokenizer", os.path.join(release["folder"], "tokenizer"), "--out", out,
            "--configs-from", release["folder"]]
    if family == "sd2":
        assert convert(base) == 2
        assert "--prediction-type v_prediction" in capsys.readouterr().err and not os.path.exists(out)
        base += ["--prediction-type", "v_prediction"]
    assert convert(base) == 0
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        ref = release["models"][name].state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            if not k.endswith("position_ids"):
                assert torch.equal(v, ref[k]), (name, k)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
