"""Model behaviours beyond parity: logical axis names on every parameter, bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec
from sd_fixtures import TINY_TEXT, TINY_UNET, TINY_VAE

from smartbrush_jax.interop.loader import abstract_params, example_inputs, init_params, logical_axes
from smartbrush_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)

MODELS = {
    "unet": lambda: UNet2DConditionModel(UNetConfig.from_diffusers({**TINY_UNET, "in_channels": 5,
                                                                    "out_channels": 5, "num_class_embeds": 11})),
    "vae": lambda: AutoencoderKL(VAEConfig.from_diffusers(TINY_VAE)),
    "text": lambda: CLIPTextModel(CLIPTextConfig.from_transformers({**TINY_TEXT, "vocab_size": 100})),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_carries_logical_axis_names(name):
    module = MODELS[name]()
    specs = traverse_util.flatten_dict(logical_axes(module))
    shapes = traverse_util.flatten_dict(abstract_params(module))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert isinstance(spec, PartitionSpec) and len(spec) == len(shapes[path].shape), path
        assert spec[-1] in ("out_features", "norm"), path
    # A sharding config maps the names to mesh axes: FSDP over output features.
    rules = (("out_features", "fsdp"), ("in_features", None), ("norm", None), ("vocab", None),
             ("kernel_h", None), ("kernel_w", None))
    kernel = next(p for p in specs if p[-1] == "kernel")
    assert nn.logical_to_mesh_axes(specs[kernel], rules)[-1] == "fsdp"


def test_bf16_compute_tracks_fp32():
    """bf16 activations with fp32 master weights stay close to the fp32 model."""
    module = MODELS["unet"]()
    params = init_params(module, jax.random.PRNGKey(0))
    x, t, ctx, s = example_inputs(module, batch=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 5))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 32))
    t = jnp.array([3, 700])
    ref = module.apply({"params": params}, x, t, ctx, s)
    bf16 = UNet2DConditionModel(module.config, dtype=jnp.bfloat16)
    out = bf16.apply({"params": params}, x, t, ctx, s)
    assert out.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
    assert err < 0.05, err


def test_missing_precision_level_is_a_clear_error():
    module = MODELS["unet"]()
    params = init_params(module, jax.random.PRNGKey(0))
    x, t, ctx, _ = example_inputs(module)
    with pytest.raises(ValueError, match="pass class_labels"):
        module.apply({"params": params}, x, t, ctx, None)


def test_text_longer_than_positions_is_a_clear_error():
    module = MODELS["text"]()
    params = init_params(module, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="78 tokens exceed max_position_embeddings=77"):
        module.apply({"params": params}, np.zeros((1, 78), np.int32))


@pytest.mark.parametrize("mask_kind", [None, "keys", "full", "causal", "empty_rows"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_chunked_attention_matches_default(mask_kind, chunk):
    """implementation="chunked" (query blocks, flash-style backward) equals
    jax.nn.dot_product_attention to 1e-5 in the output and the gradients, with and without masks."""
    from smartbrush_jax.models.layers import chunked_attention, multi_head_attention

    rng = np.random.default_rng(0)
    b, tq, tk, n, h = 2, 100, 77, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, tq, n, h), (b, tk, n, h), (b, tk, n, h)))
    causal = mask_kind == "causal"
    mask = {None: None, "causal": None,
            "keys": jnp.asarray(rng.random((b, 1, 1, tk)) > 0.3),
            "full": jnp.asarray(rng.random((b, n, tq, tk)) > 0.3),
            "empty_rows": jnp.zeros((b, 1, 1, tk), bool).at[0].set(True)}[mask_kind]

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

    def ours(q, k, v):
        return chunked_attention(q, k, v, mask=mask, is_causal=causal, query_chunk=chunk)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), argnums=(0, 1, 2))(q, k, v),
                      jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*a))), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g1, g2, atol=1e-5, rtol=1e-5)
    # through the layer entry point, [B, T, C] in and out
    flat = lambda x: x.reshape(x.shape[0], x.shape[1], n * h)  # noqa: E731
    np.testing.assert_allclose(
        multi_head_attention(flat(q), flat(k), flat(v), n, is_causal=causal, mask=mask, implementation="chunked"),
        flat(ref(q, k, v)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        multi_head_attention(flat(q), flat(k), flat(v), n, implementation="nope")


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_chunked_attention_backward_in_each_layout(monkeypatch, platform):
    """The chunked backward accumulates dK/dV as [B, N, H, Tk] on CPU (XLA:CPU's fast
    matmul form) and as [B, N, Tk, H] elsewhere (what the committed TPU compiles used).
    Both give XLA attention's gradients to 1e-5, and each platform gets its own layout."""
    from smartbrush_jax.models import attention
    from smartbrush_jax.models.layers import chunked_attention

    monkeypatch.setattr(attention, "platform", lambda: platform)
    rng = np.random.default_rng(1)
    b, tq, tk, n, h = 2, 100, 77, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, tq, n, h), (b, tk, n, h), (b, tk, n, h)))
    mask = jnp.asarray(rng.random((b, n, tq, tk)) > 0.3)

    def loss(attend):
        return lambda *a: jnp.sum(jnp.sin(attend(*a)))

    ours = loss(lambda q, k, v: chunked_attention(q, k, v, mask=mask, query_chunk=16))
    ref = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
    for g1, g2 in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(ref, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g1, g2, atol=1e-5, rtol=1e-5)
    program = str(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v))
    keys_minor, keys_major = f"f32[{b},{n},{h},{tk}]", f"f32[{b},{n},{tk},{h}]"
    assert (keys_minor in program) == (platform == "cpu")
    assert keys_major in program  # the inputs' own layout, and the accumulator off CPU
