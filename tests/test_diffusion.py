"""The schedule against diffusers (the samplers: test_solvers.py); the SmartBrush loss and sampler
against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler

from smartbrush_jax.diffusion import NoiseSchedule, add_noise, compose_noisy_latent, smartbrush_loss
from smartbrush_jax.masks import degrade_mask
from smartbrush_jax.sampling.sampler import sample
from smartbrush_jax.settings import LossConfig, SamplerConfig

SD_SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def test_alphas_cumprod_equal_diffusers():
    ours = NoiseSchedule().alphas_cumprod()
    ref = DDPMScheduler(**SD_SCHED).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        NoiseSchedule.from_diffusers({"prediction_type": "sample"})
    assert NoiseSchedule.from_diffusers({"prediction_type": "v_prediction"}).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplerConfig(sampler="pndm")
    with pytest.raises(ValueError, match="karras is an option of dpm\\+\\+2m and euler, not of ddim"):
        SamplerConfig(karras=True)
    with pytest.raises(ValueError, match="eta is DDIM's; euler takes none"):
        SamplerConfig(sampler="euler", eta=0.5)


def test_background_stays_clean_in_x_t():
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    m = np.zeros((2, 8, 8), np.float32)
    m[:, 2:6, 3:7] = 1
    t = jnp.array([10, 900])
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    x_t = np.asarray(compose_noisy_latent(x0, noise, t, jnp.asarray(m), acp))
    outside = m == 0
    np.testing.assert_array_equal(x_t[outside], np.asarray(x0)[outside])
    np.testing.assert_allclose(x_t[~outside], np.asarray(add_noise(x0, noise, t, acp))[~outside], rtol=1e-6)


def _batch(seed=0, b=4, size=8):
    rng = np.random.default_rng(seed)
    m = np.zeros((b, size, size), np.float32)
    for i in range(b):
        y, x = rng.integers(0, size - 4, 2)
        m[i, y:y + 3, x:x + 4] = 1
    return {"latents": jnp.asarray(rng.standard_normal((b, size, size, 4)), jnp.float32),
            "masks": jnp.asarray(m), "context": jnp.zeros((b, 3, 8))}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_with_an_oracle_unet_is_zero(prediction):
    """A U-Net that inverts the forward process inside m_s and predicts the exact mask
    gets MSE 0 (mask region), DICE ~0 and IoU 1: the loss measures what the paper says,
    in either parameterisation (v = sqrt(abar) eps - sqrt(1 - abar) x0)."""
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    batch = _batch()

    def oracle(params, x, t, context, levels):
        m_s = x[..., 4:5]
        abar = acp[t][:, None, None, None]
        eps = (x[..., :4] - jnp.sqrt(abar) * batch["latents"]) / jnp.sqrt(1 - abar)
        out = eps if prediction == "epsilon" else jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * batch["latents"]
        logit = jnp.where(batch["masks"] > 0, 30.0, -30.0)[..., None]
        return jnp.concatenate([out * m_s, logit], -1)

    loss, parts = smartbrush_loss(oracle, None, batch, jax.random.PRNGKey(0), acp, LossConfig(eps_region="mask"),
                                  prediction)
    assert float(parts["mse"]) < 1e-8
    assert float(parts["dice"]) < 1e-6
    assert float(parts["iou"]) == 1.0
    assert float(loss) < 1e-6


def test_loss_of_a_zero_unet_matches_closed_form():
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    batch = _batch(b=8, size=32)
    zero = lambda p, x, t, c, s: jnp.zeros(x.shape[:3] + (5,))  # noqa: E731
    loss, parts = smartbrush_loss(zero, None, batch, jax.random.PRNGKey(3), acp, LossConfig())
    # MSE of predicting 0 for standard normal noise: E[eps^2] = 1 (8*32*32*4 samples)
    assert float(parts["mse"]) == pytest.approx(1.0, abs=0.02)
    # sigmoid(0) = 1/2 everywhere: DICE = 1 - |m| / (N/2 + |m|) per example
    m = np.asarray(batch["masks"]).reshape(8, -1)
    expected = np.mean(1 - m.sum(1) / (m.shape[1] / 2 + m.sum(1)))
    assert float(parts["dice"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(float(parts["mse"]) + 0.01 * expected, rel=1e-5)


def test_dice_gradient_reaches_the_mask_logit_channel():
    """Through a real (tiny) SmartBrush U-Net: the DICE term moves the mask-logit output
    channel's weights (non-zero, finite gradient), and the noise term does not."""
    from smartbrush_jax.interop.loader import init_params
    from smartbrush_jax.models import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(in_channels=5, out_channels=5, num_class_embeddings=11, block_out_channels=(32, 32),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=(4, 4),
                     transformer_layers_per_block=(1, 1), cross_attention_dim=8, layers_per_block=1)
    model = UNet2DConditionModel(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    batch = _batch(size=8)
    apply = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731

    def part(name):
        return lambda p: smartbrush_loss(apply, p, batch, jax.random.PRNGKey(1), acp)[1][name]

    g_dice = jax.grad(part("dice"))(params)["conv_out"]
    g_mse = jax.grad(part("mse"))(params)["conv_out"]
    for g in (g_dice["kernel"][..., 4], g_dice["bias"][4]):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
    assert float(jnp.abs(g_mse["kernel"][..., 4]).max()) == 0.0


def test_loss_degrades_the_mask_given_to_the_unet():
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    batch = dict(_batch(b=3, size=16), levels=jnp.array([0, 5, 10]))
    seen = {}

    def spy(p, x, t, c, s):
        seen["mask"], seen["levels"] = x[..., 4], s
        return jnp.zeros(x.shape[:3] + (5,))

    smartbrush_loss(spy, None, batch, jax.random.PRNGKey(0), acp)
    np.testing.assert_array_equal(np.asarray(seen["levels"]), [0, 5, 10])
    expected = degrade_mask(batch["masks"], batch["levels"], 10)
    np.testing.assert_array_equal(np.asarray(seen["mask"]), np.asarray(expected))


# ---------------------------------------------------------------------------- sampler
def _stub_unet(region_logit=None):
    """Deterministic stand-in for the U-Net: eps depends on x, t and the text; the mask
    logit is +10 inside `region_logit` (a [h,w] bool) and -10 outside."""
    def apply_fn(params, x, t, context, levels):
        eps = jnp.tanh(x[..., :4]) * 0.5 + context.mean(axis=(1, 2))[:, None, None, None] \
            + (t[:, None, None, None] / 1000.0)
        if region_logit is None:
            logit = jnp.zeros(x.shape[:3] + (1,))
        else:
            logit = jnp.broadcast_to(jnp.where(region_logit, 10.0, -10.0)[None, ..., None], x.shape[:3] + (1,))
        return jnp.concatenate([eps, logit], -1)
    return apply_fn


def _sampler_inputs(b=2, size=16):
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.standard_normal((b, size, size, 4)), jnp.float32)
    m = np.zeros((b, size, size), np.float32)
    m[:, 4:12, 3:13] = 1
    cond = jnp.ones((b, 3, 8))
    uncond = jnp.zeros((b, 3, 8))
    return x0, jnp.asarray(m), jnp.zeros((b,), jnp.int32), cond, uncond


def test_sampler_restores_the_background_exactly():
    x0, m, s, cond, uncond = _sampler_inputs()
    out, pred = sample(_stub_unet(), None, x0, m, s, cond, uncond, jax.random.PRNGKey(0),
                       cfg=SamplerConfig(num_steps=8))
    outside = np.asarray(m) == 0
    np.testing.assert_array_equal(np.asarray(out)[outside], np.asarray(x0)[outside])
    assert np.abs(np.asarray(out)[~outside] - np.asarray(x0)[~outside]).max() > 1e-2
    # an all-negative logit predicts nothing: the sampler falls back to the user mask
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(m))


def test_predicted_mask_narrows_the_regenerated_region():
    x0, m, s, cond, uncond = _sampler_inputs()
    planted = np.zeros((16, 16), bool)
    planted[5:9, 4:8] = True  # inside the user mask
    cfg = SamplerConfig(num_steps=10, mask_warmup=0.3, mask_dilate=1)
    out, pred = sample(_stub_unet(planted), None, x0, m, s, cond, uncond, jax.random.PRNGKey(0), cfg=cfg)
    expected = np.zeros((16, 16), np.float32)
    expected[4:10, 3:9] = 1  # planted, dilated by one cell, within the user mask
    np.testing.assert_array_equal(np.asarray(pred)[0], expected)
    restored = expected == 0
    np.testing.assert_array_equal(np.asarray(out)[:, restored], np.asarray(x0)[:, restored])
    assert np.abs(np.asarray(out)[:, ~restored] - np.asarray(x0)[:, ~restored]).max() > 1e-2


def test_one_guided_step_in_closed_form():
    """num_steps=1: x_T from the noise, one guided DDIM step, background restored."""
    x0, m, s, cond, uncond = _sampler_inputs(b=1)
    g, key = 3.0, jax.random.PRNGKey(7)
    stub = _stub_unet()
    out, _ = sample(stub, None, x0, m, s, cond, uncond, key, cfg=SamplerConfig(num_steps=1, guidance_scale=g,
                                                                                 use_predicted_mask=False))
    k0, _ = jax.random.split(key)
    mm = m[..., None]
    x_T = jax.random.normal(k0, x0.shape) * mm + x0 * (1 - mm)
    t = jnp.array([1])  # leading spacing with offset 1 for one step
    inp = jnp.concatenate([x_T, mm], -1)
    e_c, e_u = stub(None, inp, t, cond, s)[..., :4], stub(None, inp, t, uncond, s)[..., :4]
    acp = jnp.asarray(NoiseSchedule().alphas_cumprod())
    eps = e_u + g * (e_c - e_u)  # DDIM from t = 1 to abar_0 (SD's final_alpha_cumprod), eta 0:
    x0_hat = (x_T - jnp.sqrt(1 - acp[1]) * eps) / jnp.sqrt(acp[1])
    x_prev = jnp.sqrt(acp[0]) * x0_hat + jnp.sqrt(1 - acp[0]) * eps
    expected = x_prev * mm + x0 * (1 - mm)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_sampler_is_deterministic_for_a_seed():
    x0, m, s, cond, uncond = _sampler_inputs()
    run = lambda seed: np.asarray(sample(_stub_unet(), None, x0, m, s, cond, uncond, jax.random.PRNGKey(seed),  # noqa
                                         cfg=SamplerConfig(num_steps=4, eta=0.5))[0])
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-3


def test_sampler_config_errors():
    with pytest.raises(ValueError, match="mask_warmup must be in"):
        SamplerConfig(mask_warmup=1.5)
    with pytest.raises(ValueError, match="eps_region must be"):
        LossConfig(eps_region="box")
