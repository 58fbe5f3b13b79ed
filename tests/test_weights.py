"""Weight import/export: diffusers folder, single-file LDM checkpoint, round trips, surgery, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import save_file
from sd_fixtures import assert_trees_equal, nchw, nhwc, state_dict_numpy, torch_unet, write_sd_folder

from smartbrush_jax.interop import ldm_keys
from smartbrush_jax.interop.loader import abstract_params, load_diffusers_folder, load_single_file, to_smartbrush
from smartbrush_jax.interop.weights import (
    WeightsError,
    channel_surgery,
    flax_to_torch,
    to_torch_layout,
    torch_key,
    torch_to_flax,
)
from smartbrush_jax.models import UNet2DConditionModel, UNetConfig, VAEConfig


def _write_ldm(path, models, fmt):
    unet = models["unet"]
    state = ldm_keys.diffusers_to_ldm(
        state_dict_numpy(unet), state_dict_numpy(models["vae"]), state_dict_numpy(models["text_encoder"]),
        UNetConfig.from_diffusers(dict(unet.config)), VAEConfig.from_diffusers(dict(models["vae"].config)))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    if fmt == "safetensors":
        save_file(tensors, path)
    else:  # what CompVis released: a pickle with the tensors under "state_dict"
        torch.save({"state_dict": tensors, "global_step": 470000}, path)
    return state


def test_folder_load_matches_the_torch_weights(sd_folder):
    path, models = sd_folder
    sd = load_diffusers_folder(path)
    for name, params in (("unet", sd.unet_params), ("vae", sd.vae_params), ("text_encoder", sd.text_params)):
        back = flax_to_torch(params)
        ref = {k: v for k, v in state_dict_numpy(models[name]).items() if not k.endswith("position_ids")}
        assert back.keys() == ref.keys(), name
        for k in ref:
            np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"
    ids = sd.tokenizer("the cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == sd.tokenizer.bos_token_id


def test_bin_folder_reads_with_weights_only(tmp_path):
    path = str(tmp_path / "sd_bin")
    models = write_sd_folder(path, seed=3, safe_serialization=False)
    assert os.path.isfile(os.path.join(path, "unet", "diffusion_pytorch_model.bin"))
    sd = load_diffusers_folder(path, components=("unet",))
    ref = state_dict_numpy(models["unet"])
    back = flax_to_torch(sd.unet_params)
    assert all(np.array_equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_equals_folder(sd_folder, tmp_path, fmt):
    path, models = sd_folder
    ckpt = str(tmp_path / f"sd.{fmt}")
    _write_ldm(ckpt, models, fmt)
    from_folder = load_diffusers_folder(path)
    single = load_single_file(ckpt, tokenizer_dir=os.path.join(path, "tokenizer"),
                              unet_config=from_folder.unet_config, vae_config=from_folder.vae_config,
                              text_config=from_folder.text_config)
    assert_trees_equal(single.unet_params, from_folder.unet_params)
    assert_trees_equal(single.vae_params, from_folder.vae_params)
    assert_trees_equal(single.text_params, from_folder.text_params)
    assert single.tokenizer is not None


def test_ldm_key_table_agrees_with_diffusers_converter(sd_folder, tmp_path):
    """Our LDM names, read back by diffusers' own single-file converter, give the original
    diffusers state dicts: the table is checked against an independent implementation."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    _, models = sd_folder
    state = _write_ldm(str(tmp_path / "sd.safetensors"), models, "safetensors")
    tstate = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        model = models[name]
        got = convert(tstate, dict(model.config))
        ref = model.state_dict()
        assert set(got) == set(ref), name
        for k in ref:
            np.testing.assert_array_equal(got[k].reshape(ref[k].shape).numpy(), ref[k].numpy(), err_msg=k)


def test_sd_v1_ldm_names_and_shapes():
    """Spot checks of the SD v1 single-file layout (as in the released sd-v1-*.ckpt files)."""
    cfg = UNetConfig()
    shapes = traverse_util.flatten_dict(abstract_params(UNet2DConditionModel(cfg)))
    ldm = {ldm_keys.unet_key(torch_key(p), cfg.layers_per_block, cfg.up_block_types):
           to_torch_layout(np.empty(s.shape, np.int8), p[-1]).shape for p, s in shapes.items()}
    expected = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "time_embed.0.weight": (1280, 320),
        "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in expected.items():
        assert ldm.get(k) == shape, k
    assert len(ldm) == 686  # parameter tensors of the SD v1 U-Net


def test_flax_torch_flax_round_trip_is_exact(sd_folder):
    sd = load_diffusers_folder(sd_folder[0], components=("unet", "vae"))
    for params, module in ((sd.unet_params, sd.unet()), (sd.vae_params, sd.vae())):
        again = torch_to_flax(flax_to_torch(params), abstract_params(module))
        assert_trees_equal(again, params)


def test_channel_surgery_keeps_the_original_noise_prediction():
    tm = torch_unet(seed=5)  # a stock 4-in/4-out SD-style U-Net
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = torch_to_flax(state_dict_numpy(tm), abstract_params(UNet2DConditionModel(cfg)))
    new_cfg, new_params = channel_surgery(cfg, params, num_levels=10)
    assert (new_cfg.in_channels, new_cfg.out_channels, new_cfg.num_class_embeddings) == (5, 5, 11)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((3, 5, 32)).astype(np.float32)
    t = np.array([1, 400, 999])
    with torch.no_grad():
        ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    model = UNet2DConditionModel(new_cfg)
    for mask, levels in ((np.zeros((3, 16, 16, 1)), [0, 0, 0]), (rng.uniform(size=(3, 16, 16, 1)), [10, 3, 7])):
        out = model.apply({"params": new_params}, np.concatenate([x, mask.astype(np.float32)], -1), t, ctx,
                          np.array(levels))
        np.testing.assert_allclose(out[..., :4], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(np.asarray(out[..., 4]), 0.0)
    with pytest.raises(WeightsError, match="4-in/4-out"):
        channel_surgery(new_cfg, new_params, 10)


def test_to_smartbrush_on_a_loaded_folder(sd_folder):
    sd = to_smartbrush(load_diffusers_folder(sd_folder[0], components=("unet",)), num_levels=4)
    assert sd.unet_params["conv_in"]["kernel"].shape[2] == 5
    assert sd.unet_params["class_embedding"]["embedding"].shape[0] == 5


# ---------------------------------------------------------------------------- bad input
def test_missing_component_names_the_folder(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder[0], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match=r"broken: component folder vae/ is missing"):
        load_diffusers_folder(str(broken))
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"unet: no weights file"):
        load_diffusers_folder(str(broken), components=("unet",))
    os.remove(broken / "model_index.json")
    with pytest.raises(WeightsError, match="no model_index.json"):
        load_diffusers_folder(str(broken))


def test_checkpoint_of_another_architecture_names_file_and_key(sd_folder, tmp_path):
    broken = tmp_path / "other"
    shutil.copytree(sd_folder[0], broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 48  # the weights were made with 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"unet/: key 'down_blocks\.0\.attentions\.0\..*attn2\.to_k\.weight' "
                                           r"has shape \(32, 32\).*expects \(32, 48\)"):
        load_diffusers_folder(str(broken), components=("unet",))


def test_single_file_with_wrong_shapes_names_the_ldm_key(sd_folder, tmp_path):
    ckpt = str(tmp_path / "sd.safetensors")
    _write_ldm(ckpt, sd_folder[1], "safetensors")
    with pytest.raises(WeightsError, match=r"sd\.safetensors: key 'model\.diffusion_model\.input_blocks\.0\.0\.bias' "
                                           r"has shape \(32,\).*expects \(320,\)"):
        load_single_file(ckpt)  # SD v1's config does not fit the tiny weights


def test_ckpt_with_non_tensor_objects_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match=r"evil\.ckpt: refused to load"):
        load_single_file(path)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="garbage.safetensors: not a readable safetensors file"):
        load_single_file(str(bad))
    with pytest.raises(WeightsError, match="nope.ckpt: no such file"):
        load_single_file(str(tmp_path / "nope.ckpt"))
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, str(sd2))
    with pytest.raises(WeightsError, match="sd2.safetensors: no 'model.diffusion_model.*' keys: not a single-file"):
        load_single_file(str(sd2))  # a text encoder alone


def test_unsupported_unet_option_is_refused():
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNetConfig.from_diffusers({"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        UNetConfig.from_diffusers({"block_out_channels": [48, 64, 64, 64]})


def test_params_are_float32_jax_arrays(sd_folder):
    sd = load_diffusers_folder(sd_folder[0], components=("text_encoder",))
    leaves = jax.tree_util.tree_leaves(sd.text_params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
