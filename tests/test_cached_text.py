"""Text states read instead of tokens (`--cached-text`, the program MLPerf's SD runs time:
text pre-encoded): the step on `text_states` equal to the frozen encoder's output of the
tokens is the step on the tokens, text dropout included; SDXL is refused in words."""

import jax
import numpy as np
import pytest
from flax.core import meta
from train_helpers import tiny_config

from smartbrush_jax.config import ConfigError
from smartbrush_jax.train.step import (
    abstract_batch,
    build_models,
    frozen_init_fn,
    init_state_fn,
    make_optimizer,
    make_train_step,
)


@pytest.mark.timeout(300)
def test_step_on_text_states_equals_the_step_on_tokens():
    config = tiny_config()
    config.loss.text_dropout = 0.5  # half the rows take the empty text's states: both paths must agree
    models = build_models(config, weights=False)
    tx = make_optimizer(config)
    state = meta.unbox(init_state_fn(models, tx, 0)())
    frozen = meta.unbox(frozen_init_fn(models, 0)())
    rng = np.random.default_rng(0)
    b, r = 4, config.data.resolution
    empty = np.zeros(77, np.int32)
    empty[0], empty[1] = 1, 2
    batch = {"image": rng.integers(0, 256, (b, r, r, 3), np.uint8), "mask": rng.integers(0, 2, (b, r, r), np.uint8),
             "latent_mask": rng.random((b, r, r)).astype(np.float32),
             "tokens": rng.integers(3, 40, (b, 77)).astype(np.int32)}
    step = jax.jit(make_train_step(models, config, tx, empty))
    states = jax.jit(models.encoders)(frozen, batch["tokens"])
    cached = {**{k: v for k, v in batch.items() if k != "tokens"}, "text_states": states}
    a, ma = step(state, frozen, batch)
    c, mc = step(state, frozen, cached)
    np.testing.assert_allclose(float(mc["loss"]), float(ma["loss"]), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(c.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    # and the states matter: other states, another loss
    _, mo = step(state, frozen, {**cached, "text_states": states + 1.0})
    assert abs(float(mo["loss"]) - float(ma["loss"])) > 1e-6


def test_abstract_batch_of_cached_text_and_sdxl_refused():
    from smartbrush_jax.train import sharding

    config = tiny_config()
    models = build_models(config, weights=False)
    mesh = sharding.make_mesh(dict(config.mesh.shape), devices=jax.devices()[:1])
    config.train.batch_size = 2
    spec = abstract_batch(config, models, mesh, cached_text=True)
    assert "tokens" not in spec and spec["text_states"].shape == (2, 77, config.model.text.hidden_size)
    sdxl = models.__class__(**{**models.__dict__, "text2": models.text})
    with pytest.raises(ConfigError, match="not SDXL"):
        abstract_batch(config, sdxl, mesh, cached_text=True)
