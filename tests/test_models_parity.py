"""Each Flax model against its PyTorch reference on random weights, fp32.

Error measure: max |ours - ref| / max |ref| over the whole output (`rel_err`); bound 1e-5.
"""

import jax
import numpy as np
import pytest
import torch
from sd_fixtures import (
    TINY_UNET_V2,
    TINY_UNET_XL,
    nchw,
    nhwc,
    rel_err,
    state_dict_numpy,
    torch_text,
    torch_unet,
    torch_vae,
    write_tokenizer,
)

from smartbrush_jax.interop.families import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, SD21_UNET, SDXL_UNET
from smartbrush_jax.interop.loader import abstract_params
from smartbrush_jax.interop.weights import torch_to_flax
from smartbrush_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)

TOL = 1e-5


def _flax_unet(tm):
    model = UNet2DConditionModel(UNetConfig.from_diffusers(dict(tm.config)))
    return model, torch_to_flax(state_dict_numpy(tm), abstract_params(model))


def _unet_outputs(tm, batch=2, size=16, tokens=7, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    cfg = tm.config
    x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, tokens, cfg.cross_attention_dim)).astype(np.float32)
    model, params = _flax_unet(tm)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx, labels))
    with torch.no_grad():
        cl = None if labels is None else torch.from_numpy(labels)
        ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), class_labels=cl).sample)
    return ours, ref


def test_smartbrush_unet_5in_5out_with_precision_embedding():
    tm = torch_unet(in_channels=5, out_channels=5, num_class_embeds=11)
    ours, ref = _unet_outputs(tm, labels=np.array([0, 10]))
    assert ours.shape == (2, 16, 16, 5)
    assert rel_err(ours, ref) <= TOL


def test_precision_level_changes_the_output():
    # The level must reach the network: two levels, same everything else, different outputs.
    tm = torch_unet(in_channels=5, out_channels=5, num_class_embeds=11)
    a, _ = _unet_outputs(tm, labels=np.array([0, 0]))
    b, _ = _unet_outputs(tm, labels=np.array([3, 3]))
    assert np.abs(a - b).max() > 1e-3


def test_sd2_style_unet_options():
    tm = torch_unet(**TINY_UNET_V2)
    ours, ref = _unet_outputs(tm, size=16)
    assert rel_err(ours, ref) <= TOL


def test_sdxl_unet_with_micro_conditioning_and_smartbrush_channels():
    """SDXL's U-Net options (no attention at the top level, 2-deep transformers, linear
    projections) and its "text_time" embedding (pooled text + original size, crop,
    target size), with SmartBrush's 5 channels and precision embedding."""
    tm = torch_unet(**TINY_UNET_XL, in_channels=5, out_channels=5, num_class_embeds=11)
    model, params = _flax_unet(tm)
    assert model.config.pooled_text_dim == 16
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 16, 5)).astype(np.float32)
    t, labels = np.array([10, 900]), np.array([0, 7])
    ctx = rng.standard_normal((2, 7, 40)).astype(np.float32)
    pooled = rng.standard_normal((2, 16)).astype(np.float32)
    ids = np.array([[512, 768, 0, 32, 512, 512], [1024, 1024, 64, 0, 768, 768]], np.float32)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx, labels, pooled, ids))
    with torch.no_grad():
        ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), class_labels=torch.from_numpy(labels),
                      added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                         "time_ids": torch.from_numpy(ids)}).sample)
    assert rel_err(ours, ref) <= TOL
    other = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx, labels, pooled, ids[::-1]))
    assert np.abs(other - ours).max() > 1e-3  # the size and crop numbers reach the network
    with pytest.raises(ValueError, match="needs text_embeds"):
        model.apply({"params": params}, x, t, ctx, labels)
    assert UNetConfig.from_diffusers(model.config.to_diffusers()) == model.config


def test_sdxl_text_encoder_with_projection_and_penultimate_layer(tmp_path):
    """SDXL's second encoder: `CLIPTextModelWithProjection` (gelu), its projected pooled
    output (`text_embeds`) and `hidden_states[-2]`, through the on-disk transformers format."""
    from transformers import CLIPTextConfig as TorchConfig
    from transformers import CLIPTextModelWithProjection

    vocab = write_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    tc = CLIPTextModelWithProjection(TorchConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                                 pad_token_id=vocab - 1, projection_dim=24, hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="gelu"))
    from sd_fixtures import perturb

    from smartbrush_jax.interop.weights import read_state_dict

    perturb(tc)
    tc.save_pretrained(str(tmp_path / "text_encoder_2"))

    cfg = CLIPTextConfig.from_transformers(tc.config.to_dict())
    assert cfg.projection_dim == 24 and cfg.to_transformers()["architectures"] == ["CLIPTextModelWithProjection"]
    model = CLIPTextModel(cfg)
    state = read_state_dict(str(tmp_path / "text_encoder_2" / "model.safetensors"))
    params = torch_to_flax({k.removeprefix("text_model."): v for k, v in state.items()}, abstract_params(model))
    ids = np.random.default_rng(2).integers(0, vocab - 2, (2, 77))
    ids[:, 0], ids[0, 9:], ids[1, 40:] = vocab - 2, vocab - 1, vocab - 1
    hidden, embeds, before = model.apply({"params": params}, ids, penultimate=True)
    with torch.no_grad():
        out = tc(torch.from_numpy(ids), output_hidden_states=True)
    assert rel_err(hidden, out.last_hidden_state.numpy()) <= TOL
    assert rel_err(embeds, out.text_embeds.numpy()) <= TOL and embeds.shape == (2, 24)
    assert rel_err(before, out.hidden_states[-2].numpy()) <= TOL


def test_vae_encode_mean_logvar_and_decode():
    tv = torch_vae()
    model = AutoencoderKL(VAEConfig.from_diffusers(dict(tv.config)))
    params = torch_to_flax(state_dict_numpy(tv), abstract_params(model))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    pixels = model.apply({"params": params}, z, method=model.decode)
    with torch.no_grad():
        dist = tv.encode(nchw(x)).latent_dist
        ref_pixels = tv.decode(nchw(z)).sample
    assert rel_err(mean, nhwc(dist.mean)) <= TOL
    assert rel_err(logvar, nhwc(dist.logvar)) <= TOL
    assert rel_err(pixels, nhwc(ref_pixels)) <= TOL
    assert model.config.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_encoder(tmp_path, act):
    vocab = write_tokenizer(str(tmp_path))
    tc = torch_text(vocab, hidden_act=act)
    model = CLIPTextModel(CLIPTextConfig.from_transformers(tc.config.to_dict()))
    params = torch_to_flax(state_dict_numpy(tc), abstract_params(model))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab - 2, (3, 77))
    ids[:, 0] = vocab - 2
    for row, eos in enumerate((5, 30, 76)):
        ids[row, eos:] = vocab - 1
    hidden, pooled = model.apply({"params": params}, ids)
    with torch.no_grad():
        out = tc(torch.from_numpy(ids))
    assert rel_err(hidden, out.last_hidden_state.numpy()) <= TOL
    assert rel_err(pooled, out.pooler_output.numpy()) <= TOL
    # with a padding mask too
    mask = (np.arange(77)[None] < np.array([[6], [31], [77]])).astype(np.int64)
    hidden_m, _ = model.apply({"params": params}, ids, mask)
    with torch.no_grad():
        ref_m = tc(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert rel_err(hidden_m, ref_m) <= TOL


@pytest.mark.slow
def test_full_sd_v1_unet_architecture():
    """The real SD v1 U-Net shape (~860M parameters), random weights, 64x64 latents, batch 1,
    as SmartBrush uses it (5 in / 5 out, 11 precision levels)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    tm = TorchUNet(in_channels=5, out_channels=5, num_class_embeds=11, sample_size=64, cross_attention_dim=768,
                   block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, layers_per_block=2).eval()
    ours, ref = _unet_outputs(tm, batch=1, size=64, tokens=77, labels=np.array([4]))
    err = rel_err(ours, ref)
    print(f"full SD v1 U-Net: max rel err {err:.2e}")
    assert err <= TOL


# Full-size architectures: the published SD 2.1 (768, v-prediction) and SDXL base 1.0
# component configs (interop/families.py); SmartBrush's 5 channels and 11 levels on the U-Nets.


def _shapes_match(torch_model, ours):
    """Same state-dict keys with the same dimensions (up to the layout change), and the same
    parameter count; torch side on the meta device, ours from `eval_shape`: no weights."""
    from flax import traverse_util

    from smartbrush_jax.interop.weights import torch_key

    ref = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    mine = {torch_key(p): tuple(v.shape) for p, v in traverse_util.flatten_dict(abstract_params(ours)).items()}
    assert set(mine) == set(ref), (sorted(set(mine) ^ set(ref)))[:10]
    bad = [k for k in ref if sorted(ref[k]) != sorted(mine[k])]
    assert not bad, [(k, ref[k], mine[k]) for k in bad[:5]]
    return sum(int(np.prod(s)) for s in ref.values())


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_full_size_unet_shapes(name):
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = dict(SD21_UNET if name == "sd21" else SDXL_UNET, in_channels=5, out_channels=5, num_class_embeds=11)
    with torch.device("meta"):
        tm = TorchUNet(**cfg)
    n = _shapes_match(tm, UNet2DConditionModel(UNetConfig.from_diffusers(dict(tm.config))))
    assert abs(n / 1e6 - {"sd21": 866, "sdxl": 2568}[name]) < 5, n  # the published sizes, in millions


@pytest.mark.parametrize("name,spec,with_projection", [("openclip_h", OPENCLIP_H, False), ("clip_l", CLIP_L, False),
                                                        ("openclip_bigg", OPENCLIP_BIGG, True)])
def test_full_size_text_encoder_shapes(name, spec, with_projection):
    from transformers import CLIPTextConfig as TorchConfig
    from transformers import CLIPTextModel as TorchText
    from transformers import CLIPTextModelWithProjection

    tcfg = TorchConfig(vocab_size=49408, max_position_embeddings=77, **spec)
    with torch.device("meta"):
        tc = (CLIPTextModelWithProjection if with_projection else TorchText)(tcfg)
    cfg = CLIPTextConfig.from_transformers({**tc.config.to_dict(), "architectures": [type(tc).__name__]})
    assert (cfg.projection_dim is not None) == with_projection

    class Stripped(torch.nn.Module):  # the state dict as our loader reads it: no "text_model." prefix
        def state_dict(self):
            return {k.removeprefix("text_model."): v for k, v in tc.state_dict().items()}

    n = _shapes_match(Stripped(), CLIPTextModel(cfg))
    assert abs(n / 1e6 - {"openclip_h": 340, "clip_l": 123, "openclip_bigg": 695}[name]) < 5, n
