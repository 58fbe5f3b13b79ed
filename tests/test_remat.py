"""U-Net rematerialisation (`model.remat`): the same parameters, the same loss and
gradients as without it, and the recomputation really is in the backward program."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from sd_fixtures import TINY_UNET

from smartbrush_jax.config import REMAT, ConfigError, base_config, validate
from smartbrush_jax.interop.loader import abstract_params, init_params, logical_axes
from smartbrush_jax.models import UNet2DConditionModel, UNetConfig
from smartbrush_jax.models.unet import REMAT_POLICIES

CONFIG = UNetConfig.from_diffusers({**TINY_UNET, "in_channels": 5, "out_channels": 5, "num_class_embeds": 11})


def _inputs():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    return (jax.random.normal(k[0], (2, 16, 16, 5)), jnp.array([3, 700]), jax.random.normal(k[1], (2, 7, 32)),
            jnp.array([0, 10]), jax.random.normal(k[2], (2, 16, 16, 5)))


@functools.lru_cache(maxsize=None)
def _reference():
    params = init_params(UNet2DConditionModel(CONFIG), jax.random.PRNGKey(0))
    return params, _loss_and_grads("none", params)


def _loss_and_grads(remat, params):
    model = UNet2DConditionModel(CONFIG, remat=remat)
    x, t, ctx, s, target = _inputs()

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x, t, ctx, s) - target) ** 2)

    return jax.jit(jax.value_and_grad(loss_fn))(params), jax.make_jaxpr(jax.grad(loss_fn))(params)


def test_config_names_match_the_model():
    assert tuple(REMAT) == tuple(REMAT_POLICIES)


@pytest.mark.parametrize("remat", [r for r in REMAT if r != "none"])
def test_remat_keeps_parameters_loss_and_gradients(remat):
    ref_params, ((loss_ref, g_ref), jaxpr_ref) = _reference()
    # the same names and shapes (the PyTorch weight mapping relies on them), hence the same
    # initial values: flax derives each parameter's RNG from its path
    shapes = traverse_util.flatten_dict(abstract_params(UNet2DConditionModel(CONFIG, remat=remat)))
    assert {k: v.shape for k, v in shapes.items()} == {
        k: v.shape for k, v in traverse_util.flatten_dict(ref_params).items()}
    assert logical_axes(UNet2DConditionModel(CONFIG, remat=remat)) == logical_axes(UNet2DConditionModel(CONFIG))

    (loss, g), jaxpr = _loss_and_grads(remat, ref_params)
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref))
    # relative to the largest gradient (rel_err of the parity tests): some gradients are
    # rounding noise around 0 (a conv bias right before a GroupNorm)
    g, g_ref = traverse_util.flatten_dict(g), traverse_util.flatten_dict(g_ref)
    scale = max(float(jnp.abs(v).max()) for v in g_ref.values())
    err = max(float(jnp.abs(g[k] - g_ref[k]).max()) for k in g_ref)
    assert err <= 1e-5 * scale, (err, scale)
    # each resnet and transformer is its own checkpoint region in the differentiated program
    lpb = CONFIG.layers_per_block
    resnets, transformers = 2 * lpb + 2 + 2 * (lpb + 1), lpb + 1 + (lpb + 1)  # down, mid, up
    regions = lambda j: sum(e.primitive.name == "remat2" for e in j.jaxpr.eqns)  # noqa: E731
    assert regions(jaxpr_ref) == 0
    assert regions(jaxpr) == resnets + transformers, regions(jaxpr)


def test_attention_outputs_carry_the_name_the_attention_policies_keep():
    model = UNet2DConditionModel(CONFIG, remat="attention_saveable")
    x, t, ctx, s, _ = _inputs()
    params, _ = _reference()
    text = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, ctx, s))(params))
    assert "name=attention_out" in text
    assert "saveable_names=frozenset({" in text and "'attention_out'" in text and "'splash_residuals'" in text


def test_unknown_remat_is_a_clear_error():
    c = base_config()
    c.model.autoencoder, c.data.synthetic_scenes = "identity", 8
    validate(c)
    c.model.remat = "dots"
    with pytest.raises(ConfigError, match="config.model.remat: must be one of"):
        validate(c)
    with pytest.raises(ValueError, match="remat 'dots' is not one of"):
        abstract_params(UNet2DConditionModel(CONFIG, remat="dots"))
