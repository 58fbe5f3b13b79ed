"""Each sampler of `sampling/solvers.py` against its diffusers scheduler, step for step: the
timesteps and noise levels it plans, and the latent after every step of a loop driven by a
fixed nonlinear stand-in for the U-Net (float32; 1e-5 on latents), for epsilon and
v-prediction, every timestep spacing, with and without Karras sigmas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from smartbrush_jax.diffusion import NoiseSchedule
from smartbrush_jax.sampling import solvers

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)
CLASSES = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
           "euler_a": EulerAncestralDiscreteScheduler}
SHAPE = (2, 4, 6, 3)


def reference(name, prediction, spacing, karras, **extra):
    kw = dict(SD, prediction_type=prediction, **extra)
    if spacing is not None:
        kw["timestep_spacing"] = spacing
    if karras:
        kw["use_karras_sigmas"] = True
    if name == "ddim":
        kw.update(clip_sample=False, set_alpha_to_one=False)
    return CLASSES[name](**kw)


def ours(name, prediction, spacing, karras, steps, **extra):
    schedule = NoiseSchedule(prediction_type=prediction, timestep_spacing=spacing)
    return solvers.plan(name, schedule.alphas_cumprod(), steps, spacing=schedule.timestep_spacing,
                        steps_offset=schedule.steps_offset, karras=karras, **extra)


def stand_in(x, t):
    """A fixed model output (eps or v) that depends on the latent and the timestep."""
    lib = torch if isinstance(x, torch.Tensor) else jnp
    return 0.6 * lib.tanh(x) + 0.2 * lib.sin(x * 3.0 + t / 150.0) - 0.05 * x


def diffusers_trajectory(sched, steps, x, noises):
    """[N] latents after each step, in the U-Net's space (Euler's sample divided by
    sqrt(1 + sigma^2)), and the first latent's scale."""
    sched.set_timesteps(steps)
    x = torch.from_numpy(x) * float(sched.init_noise_sigma)
    out = []
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        kwargs = {}
        if isinstance(sched, EulerAncestralDiscreteScheduler):
            kwargs["generator"] = noises[i]
        x = sched.step(stand_in(inp, t.float()), t, x, **kwargs).prev_sample
        level = float(sched.sigmas[i + 1]) if hasattr(sched, "sigmas") and not isinstance(
            sched, (DDIMScheduler, DPMSolverMultistepScheduler)) else 0.0
        out.append(x.numpy() / np.sqrt(1.0 + level ** 2))
    return np.stack(out)


def our_trajectory(p, prediction, x, noises):
    arr = solvers.device_arrays(p)

    def body(carry, i):
        x, x0_prev = carry
        out = stand_in(x, arr["t"][i])
        x0 = solvers.clean_estimate(out, x, arr["alpha"][i], arr["sigma"][i], prediction)
        x = solvers.update(arr, i, x, x0, x0_prev, noises[i] if noises is not None else None)
        return (x, x0), x

    run = jax.jit(lambda x: jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(p.num_steps))[1])
    return np.asarray(run(jnp.asarray(x) * p.init_scale))


CASES = [(name, pred, spacing, karras, steps)
         for name in ("dpm++2m", "euler", "euler_a")
         for pred in ("epsilon", "v_prediction")
         for spacing in (None, "leading", "trailing")
         for karras in ((False, True) if name in solvers.KARRAS else (False,))
         for steps in ((20, 8) if name == "dpm++2m" else (20,))]


@pytest.mark.parametrize("name,prediction,spacing,karras,steps", CASES)
def test_sampler_equals_diffusers_step_for_step(name, prediction, spacing, karras, steps):
    ref = reference(name, prediction, spacing, karras)
    p = ours(name, prediction, spacing, karras, steps)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(p.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=0, atol=1e-3)
    np.testing.assert_allclose(p.sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=1e-7)  # abar: float64 vs float32
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noises = gens = None
    if name == "euler_a":  # the same noise on both sides: diffusers draws it from a generator per step
        gens = [torch.Generator().manual_seed(100 + i) for i in range(steps)]
        noises = jnp.asarray(np.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)).numpy()
                                       for i in range(steps)]))
    want = diffusers_trajectory(ref, steps, x, gens)
    got = our_trajectory(p, prediction, x, noises)
    for i in range(steps):
        np.testing.assert_allclose(got[i], want[i], rtol=0, atol=1e-5 * max(1.0, np.abs(want[i]).max()),
                                   err_msg=f"step {i}")


@pytest.mark.parametrize("spacing", [None, "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_equals_diffusers_step_for_step(spacing, prediction, eta):
    steps = 25
    ref = reference("ddim", prediction, spacing, False)
    p = ours("ddim", prediction, spacing, False, steps, eta=eta)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(p.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    z = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    got = our_trajectory(p, prediction, x, jnp.asarray(z) if eta else None)
    xt = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        xt = ref.step(stand_in(xt, t.float()), t, xt, eta=eta, variance_noise=torch.from_numpy(z[i])).prev_sample
        np.testing.assert_allclose(got[i], xt.numpy(), rtol=0, atol=1e-5 * max(1.0, np.abs(xt.numpy()).max()),
                                   err_msg=f"step {i}")


def test_heun_solver_type_and_refusals():
    p = ours("dpm++2m", "epsilon", None, False, 12, solver_type="heun")
    ref = reference("dpm++2m", "epsilon", None, False, solver_type="heun")
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    # heun's (e^-h - 1) / h + 1 cancels for small h: diffusers computes it in float32 (we in
    # float64), ~2e-5 apart after 12 steps
    np.testing.assert_allclose(our_trajectory(p, "epsilon", x, None)[-1], diffusers_trajectory(ref, 12, x, None)[-1],
                               rtol=0, atol=1e-4)
    acp = NoiseSchedule().alphas_cumprod()
    with pytest.raises(ValueError, match="Karras sigmas are an option of dpm\\+\\+2m and euler"):
        solvers.plan("euler_a", acp, 10, karras=True)
    with pytest.raises(ValueError, match="sampler 'pndm'"):
        solvers.plan("pndm", acp, 10)
    with pytest.raises(ValueError, match="num_steps must be in"):
        solvers.plan("euler", acp, 0)
    with pytest.raises(ValueError, match="timestep_spacing 'karras'"):
        NoiseSchedule(timestep_spacing="karras")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        NoiseSchedule.from_diffusers({"prediction_type": "sample"})
