"""Which SD family weights are, read from what the files say; a family asked for that the
weights are not, and a 9-channel inpainting U-Net, are refused with what to do."""

import json
import os

import pytest
from sd_fixtures import TINY_UNET, TINY_UNET_V2, TINY_UNET_XL, write_sdxl_folder

from smartbrush_jax.interop.families import FamilyError, check_family, check_vae, family_of, refuse_inpainting_unet
from smartbrush_jax.models import UNetConfig, VAEConfig


def _cfg(**kw):
    return UNetConfig.from_diffusers(kw)


def test_family_from_the_unet_config_and_model_index():
    assert family_of(_cfg(**TINY_UNET)) == "sd1"
    assert family_of(_cfg(cross_attention_dim=768)) == "sd1"
    assert family_of(_cfg(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))) == "sd2"
    assert family_of(_cfg(**TINY_UNET_V2)) == "sd2"  # linear projections at any width
    assert family_of(_cfg(**TINY_UNET_XL)) == "sdxl"
    assert family_of(_cfg(**TINY_UNET_V2), {"_class_name": "StableDiffusionXLPipeline"}) == "sdxl"


def test_a_wrong_family_and_an_inpainting_unet_are_refused():
    check_family("auto", "sd2", "/m")
    check_family("sd2", "sd2", "/m")
    with pytest.raises(FamilyError, match="/m is sd1, not sdxl: set config.model.family=sd1"):
        check_family("sdxl", "sd1", "/m")
    with pytest.raises(FamilyError, match="must be auto or one of"):
        check_family("sd3", "sd1", "/m")
    with pytest.raises(FamilyError, match="9-channel inpainting U-Net"):
        refuse_inpainting_unet(_cfg(**TINY_UNET, in_channels=9), "/m/unet")
    refuse_inpainting_unet(_cfg(**TINY_UNET), "/m/unet")


def test_training_from_weights_of_another_family_says_so(sd_folder):
    """config.model.family=sdxl on SD-v1-style weights fails where the models are built
    (an InputError: exit 2 from the trainer), naming the family the weights are."""
    from smartbrush_jax.config import base_config
    from smartbrush_jax.train.step import build_models

    c = base_config()
    c.model.init_from, c.model.family = sd_folder[0], "sdxl"
    with pytest.raises(FamilyError, match="is sd1, not sdxl"):
        build_models(c)
    c.model.family = "sd1"
    assert build_models(c).model_config()["family"] == "sd1"


def test_an_sdxl_folder_written_by_diffusers_loads_with_both_text_encoders(tmp_path):
    import numpy as np
    import torch
    from sd_fixtures import rel_err

    from smartbrush_jax.interop.loader import folder_components, load_model

    models = write_sdxl_folder(str(tmp_path))
    assert set(folder_components(str(tmp_path))) >= {"text_encoder_2", "tokenizer_2"}
    sd = load_model(str(tmp_path))
    assert family_of(sd.unet_config) == "sdxl" and sd.unet_config.pooled_text_dim == 16
    assert sd.text2_config.projection_dim == 16 and sd.tokenizer_2 is not None
    ids = sd.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids
    from transformers import CLIPTokenizer  # the same words from the vocab.json + merges.txt it was made of
    ref_tok = CLIPTokenizer.from_pretrained(str(tmp_path / "_tok"), local_files_only=True, pad_token="!")
    assert (ids == ref_tok(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids).all()
    # the second tokenizer's ids are the first's re-padded (what the trainer feeds encoder 2)
    from smartbrush_jax.models.conditioning import repad

    ids1 = sd.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids
    assert (ids1 != ids).any()
    assert (np.asarray(repad(ids1, sd.tokenizer.eos_token_id, sd.tokenizer_2.pad_token_id)) == ids).all()
    hidden, embeds, before = sd.text_encoder_2().apply({"params": sd.text2_params}, ids, penultimate=True)
    with torch.no_grad():
        out = models["text_encoder_2"](torch.from_numpy(ids), output_hidden_states=True)
    assert rel_err(embeds, out.text_embeds.numpy()) <= 1e-5
    assert rel_err(before, out.hidden_states[-2].numpy()) <= 1e-5
    assert sd.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert np.isfinite(np.asarray(sd.unet_params["add_embedding"]["linear_1"]["kernel"])).all()


def test_a_vae_of_another_family_or_width_is_refused(tmp_path):
    """SDXL's VAE has the SD VAE's architecture and its own latent scale (0.13025): an SDXL
    folder holding the SD v1/2.x VAE (0.18215), or a VAE of another latent width, is refused
    where the models are built, naming what is wrong."""
    from smartbrush_jax.config import base_config
    from smartbrush_jax.train.step import build_models

    folder = str(tmp_path / "sdxl")
    write_sdxl_folder(folder)
    c = base_config()
    c.model.init_from = folder
    assert build_models(c).model_config()["family"] == "sdxl"  # its own VAE: fine
    cfg_path = os.path.join(folder, "vae", "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "scaling_factor": 0.18215}, open(cfg_path, "w"))
    with pytest.raises(FamilyError, match=r"scaling_factor 0.18215 is the sd1/sd2 VAE's, this U-Net is sdxl "
                                          r"\(0.13025\): put the sdxl VAE in vae/"):
        build_models(c)
    with pytest.raises(FamilyError, match="the VAE makes 16-channel latents, the U-Net takes 4 channels"):
        check_vae("sd1", VAEConfig(latent_channels=16), UNetConfig(), "/m")


def test_an_sdxl_folder_without_its_second_text_encoder_is_refused(tmp_path):
    """A half-copied SDXL folder: text_encoder_2/ missing (model_index.json still names it),
    or dropped from model_index.json too; either way refused where the models are built."""
    import shutil

    from smartbrush_jax.config import base_config
    from smartbrush_jax.errors import InputError
    from smartbrush_jax.train.step import build_models

    folder = str(tmp_path / "sdxl")
    write_sdxl_folder(folder)
    shutil.rmtree(os.path.join(folder, "text_encoder_2"))
    c = base_config()
    c.model.init_from = folder
    with pytest.raises(InputError, match=r"sdxl: component folder text_encoder_2/ is missing"):
        build_models(c)
    index_path = os.path.join(folder, "model_index.json")
    index = json.load(open(index_path))
    del index["text_encoder_2"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(InputError, match=r"an SDXL U-Net \(micro-conditioning\) needs both text encoders and "
                                         r"tokenizers \(.*text_encoder_2/, tokenizer_2/"):
        build_models(c)


def test_family_configs_build_and_mismatched_text_fields_are_refused():
    """The SD 2.x and SDXL configs build their full-size models without weights (what an
    ahead-of-time compile does) with the published parameter counts; text fields that do not
    fit the U-Net are a ConfigError naming the fields, not a shape error deep in a compile."""
    import importlib.util

    import jax
    import numpy as np

    from smartbrush_jax.config import ConfigError
    from smartbrush_jax.interop.loader import abstract_params
    from smartbrush_jax.train.step import build_models

    def config(name):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config()

    def millions(module):
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(module))) / 1e6

    for name, unet, text, text2 in (("tpu_v5p_sd2", 866, 340, None), ("tpu_v5p_sdxl", 2568, 123, 695)):
        m = build_models(config(name), weights=False)
        assert abs(millions(m.unet) - unet) < 5 and abs(millions(m.text) - text) < 5
        assert (m.text2 is None) == (text2 is None) and (text2 is None or abs(millions(m.text2) - text2) < 5)
    c = config("tpu_v5p_sdxl")
    c.model.text2 = {}
    with pytest.raises(ConfigError, match=r"config.model.text \(768 wide\) does not fit config.model.unet "
                                          r"\(cross_attention_dim 2048, SDXL text_time, pooled 1280\)"):
        build_models(c, weights=False)
    c = config("tpu_v5p_sd2")
    c.model.text.hidden_size = 768
    with pytest.raises(ConfigError, match=r"\(768 wide\) does not fit .*cross_attention_dim 1024, no text_time"):
        build_models(c, weights=False)
