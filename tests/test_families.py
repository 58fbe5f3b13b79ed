"""Which SD family weights are, read from what the files say; a family asked for that the
weights are not, and a 9-channel inpainting U-Net, are refused with what to do."""

import pytest
from sd_fixtures import TINY_UNET, TINY_UNET_V2, TINY_UNET_XL

from smartbrush_jax.interop.families import FamilyError, check_family, family_of, refuse_inpainting_unet
from smartbrush_jax.models import UNetConfig


def _cfg(**kw):
    return UNetConfig.from_diffusers(kw)


def test_family_from_the_unet_config_and_model_index():
    assert family_of(_cfg(**TINY_UNET)) == "sd1"
    assert family_of(_cfg(cross_attention_dim=768)) == "sd1"
    assert family_of(_cfg(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))) == "sd2"
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
