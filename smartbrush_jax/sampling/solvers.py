"""The samplers as one update rule, planned on the host and run in one `lax` loop.

Every sampler here moves the latent in the variance-preserving space the U-Net sees,
x_t = alpha_t x0 + sigma_t eps (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)), and
every step is

    x0_i  = the model's clean-latent estimate at step i (from eps or v)
    x_i+1 = A_i x_i + B_i x0_i + P_i x0_{i-1} + C_i z_i        (z_i ~ N(0, 1))

with per-step coefficients computed once in float64 from the sampler's noise levels:

    ddim      DDIM (eta >= 0)                                   P = 0; C = eta's std
    dpm++2m   DPM-Solver++ 2M (midpoint or heun), first order on the first step and on
              the last (lower_order_final, a final sigma of 0); Karras sigmas optional
    euler     Euler on the probability-flow ODE in sigma = sqrt((1 - abar) / abar)
              (s_churn 0); Karras sigmas optional                        P = 0, C = 0
    euler_a   Euler ancestral: to sigma_down, plus sigma_up of fresh noise       P = 0

Each plan reproduces the timesteps and noise levels of its diffusers scheduler
(`DDIMScheduler`, `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`,
`EulerAncestralDiscreteScheduler`) for the same scheduler config, including the
`timestep_spacing` (`leading`, `linspace`, `trailing`; unset: that scheduler's own
default) and `steps_offset`. Euler's own sample lives in sigma space (x / alpha); this
module keeps x in the U-Net's space, which is the same trajectory scaled by alpha.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from smartbrush_jax.settings import KARRAS, PREDICTIONS, SAMPLERS, SPACINGS  # noqa: F401 (re-exported)

# what each diffusers scheduler uses when the config does not say
DEFAULT_SPACING = {"ddim": "leading", "dpm++2m": "linspace", "euler": "linspace", "euler_a": "linspace"}
RHO = 7.0  # Karras et al. (2022)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampler's N steps: the U-Net's timestep at each, the noise level sigma (sigma
    space) at each and after the last, and the update coefficients (float32 arrays)."""

    name: str
    timesteps: np.ndarray  # [N] float32
    sigmas: np.ndarray  # [N+1] float32
    a: np.ndarray  # [N] coefficient of x_i
    b: np.ndarray  # [N] of x0_i
    p: np.ndarray  # [N] of x0_{i-1} (the multistep term)
    c: np.ndarray  # [N] of fresh noise
    init_scale: float  # the first latent is init_scale x N(0, 1) (in the U-Net's space)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def alphas(self) -> np.ndarray:
        """[N] alpha_i = sqrt(abar) of each step's noise level."""
        return (1.0 / np.sqrt(1.0 + self.sigmas[:-1].astype(np.float64) ** 2)).astype(np.float32)

    @property
    def noise_levels(self) -> np.ndarray:
        """[N] sigma_i = sqrt(1 - abar) of each step (the U-Net's space)."""
        s = self.sigmas[:-1].astype(np.float64)
        return (s / np.sqrt(1.0 + s ** 2)).astype(np.float32)

    @property
    def noisy(self) -> bool:
        return bool(np.any(self.c != 0))


def plan(name: str, alphas_cumprod: np.ndarray, num_steps: int, spacing: Optional[str] = None,
         steps_offset: int = 0, karras: bool = False, eta: float = 0.0, final_alpha_cumprod: Optional[float] = None,
         solver_type: str = "midpoint") -> Plan:
    """The plan of sampler `name` over a training schedule's `alphas_cumprod` ([T] float32).
    `final_alpha_cumprod`: DDIM's abar after the last step (SD: abar_0; `set_alpha_to_one`: 1)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}; one of {SAMPLERS}")
    spacing = spacing or DEFAULT_SPACING[name]
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported ({', '.join(SPACINGS)})")
    if karras and name not in KARRAS:
        raise ValueError(f"Karras sigmas are an option of {' and '.join(KARRAS)}, not of {name}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r}; 'midpoint' or 'heun'")
    acp = np.asarray(alphas_cumprod, np.float32)
    n_train = len(acp)
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
    if name == "ddim":
        return _ddim(acp, num_steps, spacing, steps_offset, eta,
                     float(acp[0]) if final_alpha_cumprod is None else final_alpha_cumprod)
    table = np.sqrt((1.0 - acp) / acp)  # float32, as the schedulers compute it
    if name == "dpm++2m":
        ts = _dpm_timesteps(n_train, num_steps, spacing, steps_offset)
        if karras:
            sig = _karras(float(table[0]), float(table[-1]), num_steps)
            ts = np.round(_sigma_to_t(sig, np.log(table)))
        else:
            sig = np.interp(ts, np.arange(n_train), table)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        return _dpm(name, ts.astype(np.float32), sigmas, solver_type)
    ts = _euler_timesteps(n_train, num_steps, spacing, steps_offset)
    sig = np.interp(ts, np.arange(n_train), table)
    if karras:
        sig = _karras(float(sig[-1]), float(sig[0]), num_steps)
        ts = _sigma_to_t(sig, np.log(table))
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top ** 2 + 1.0) ** 0.5  # Euler's init_noise_sigma
    init_scale = init / (1.0 + float(sigmas[0]) ** 2) ** 0.5  # ... in the U-Net's space
    return (_euler if name == "euler" else _euler_ancestral)(name, ts.astype(np.float32), sigmas, init_scale)


# ---------------------------------------------------------------------------- timesteps
def _ddim_timesteps(n_train, n, spacing, offset):
    if spacing == "leading":
        return np.arange(n)[::-1] * (n_train // n) + offset
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    return np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1


def _dpm_timesteps(n_train, n, spacing, offset):
    # DPM-Solver's spacings place n + 1 points and drop the last (t = 0)
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (n_train // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(n_train, 0, -n_train / n).round().astype(np.int64) - 1


def _euler_timesteps(n_train, n, spacing, offset):
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (n_train // n)).round()[::-1].astype(np.float32) + offset
    return np.arange(n_train, 0, -n_train / n).round().astype(np.float32) - 1


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
    return (hi + ramp * (lo - hi)) ** RHO


def _sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear in log sigma between the two
    table entries around it (clipped to the table's ends)."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_s, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[low] - log_s) / (log_table[low] - log_table[low + 1]), 0, 1)
    return low + w


# ---------------------------------------------------------------------------- coefficients
def _vp(sigma):
    """(alpha, sigma) of the U-Net's space for sigma-space noise levels (float64)."""
    s = np.asarray(sigma, np.float64)
    alpha = 1.0 / np.sqrt(1.0 + s ** 2)
    return alpha, s * alpha


def _ddim(acp, n, spacing, offset, eta, final):
    n_train = len(acp)
    ts = _ddim_timesteps(n_train, n, spacing, offset)
    prev = ts - n_train // n  # DDIM steps to t - T // N whatever the spacing
    a_t = acp[ts].astype(np.float64)
    a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)].astype(np.float64), final)
    std = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    a = np.sqrt(np.maximum(1.0 - a_prev - std ** 2, 0.0)) / np.sqrt(1.0 - a_t)
    b = np.sqrt(a_prev) - a * np.sqrt(a_t)
    sig = np.sqrt((1.0 - np.concatenate([a_t, [a_prev[-1]]])) / np.concatenate([a_t, [a_prev[-1]]]))
    return Plan("ddim", ts.astype(np.float32), sig.astype(np.float32), *_f32(a, b, np.zeros(n), std), 1.0)


def _dpm(name, ts, sigmas, solver_type):
    n = len(ts)
    al, sg = _vp(sigmas)
    s0, s1 = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)  # this step's level and the next
    with np.errstate(divide="ignore"):
        a = sg[1:] / sg[:-1]
        b = al[1:] * (1.0 - s1 / s0)  # alpha' (1 - e^-h), e^-h = sigma' / sigma
        h = np.log(s0) - np.log(s1)  # lambda' - lambda (inf into sigma = 0)
    p = np.zeros(n)
    for i in range(1, n):
        if i == n - 1 and sigmas[-1] == 0:
            continue  # the last step into sigma 0 is first order (lower_order_final)
        r = np.log(sigmas[i - 1] / s0[i]) / h[i]  # h_{i-1} / h_i
        if solver_type == "midpoint":
            d1 = 0.5 * b[i]
        else:
            d1 = al[i + 1] * ((np.exp(-h[i]) - 1.0) / h[i] + 1.0)
        b[i], p[i] = b[i] + d1 / r, -d1 / r
    return Plan(name, ts, sigmas, *_f32(a, b, p, np.zeros(n)), 1.0)


def _euler(name, ts, sigmas, init_scale):
    n = len(ts)
    al, _ = _vp(sigmas)
    ratio = sigmas[1:].astype(np.float64) / sigmas[:-1]
    a = al[1:] / al[:-1] * ratio
    b = al[1:] * (1.0 - ratio)
    return Plan(name, ts, sigmas, *_f32(a, b, np.zeros(n), np.zeros(n)), init_scale)


def _euler_ancestral(name, ts, sigmas, init_scale):
    n = len(ts)
    al, _ = _vp(sigmas)
    s, s_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    down = np.sqrt(s_next ** 2 - up ** 2)
    a = al[1:] / al[:-1] * down / s
    b = al[1:] * (1.0 - down / s)
    return Plan(name, ts, sigmas, *_f32(a, b, np.zeros(n), al[1:] * up), init_scale)


def _f32(*arrays):
    return tuple(np.asarray(x, np.float32) for x in arrays)


# ---------------------------------------------------------------------------- in the loop (JAX)
def device_arrays(p: Plan) -> dict:
    """The plan as the loop reads it: [N] jnp arrays indexed by the step."""
    import jax.numpy as jnp

    return {"t": jnp.asarray(p.timesteps), "a": jnp.asarray(p.a), "b": jnp.asarray(p.b), "p": jnp.asarray(p.p),
            "c": jnp.asarray(p.c), "alpha": jnp.asarray(p.alphas), "sigma": jnp.asarray(p.noise_levels)}


def clean_estimate(out, x, alpha, sigma, prediction_type: str):
    """x0 from the model's output at noise level (alpha, sigma): eps or v."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    raise ValueError(f"prediction_type {prediction_type!r}; one of {PREDICTIONS}")


def update(arrays: dict, i, x, x0, x0_prev, noise=None):
    """x_{i+1} from x_i, this step's clean estimate and the previous one's (and noise, for
    the samplers that draw it)."""
    out = arrays["a"][i] * x + arrays["b"][i] * x0 + arrays["p"][i] * x0_prev
    return out if noise is None else out + arrays["c"][i] * noise
