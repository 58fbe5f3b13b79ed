"""Know before booking a pod: the SmartBrush train step compiled ahead of time for a TPU
slice, on any host (this CPU machine included), through the `libtpu` wheel.

    python -m smartbrush_jax.aot --config=configs/tpu_v4.py --topology=v4-32
    python -m smartbrush_jax.aot --config=configs/tpu_v5p.py --topology=2xv5p-128 --cached-latents
    python -m smartbrush_jax.aot --config=configs/tpu_v4.py --topology=v4-32 --find-max-batch

The state, frozen models and batch are built as abstract arrays with their shardings by the
trainer's own code (`trainer.build_step(materialize=False)`, `trainer.abstract_batch`) on a
mesh of the slice's devices (`sharding.make_mesh`, laid out by the torus), the step is
lowered and compiled for the target, and the report (`compile_report.py`) gives the memory
per chip against its HBM, XLA's FLOPs against ours, the collectives by kind with their
bytes, and a step-time estimate labelled with how it was obtained. The weights' values do
not matter to a compile, so none are read: a run from SD weights compiles with SD v1's
shapes (`train_state.build_models(weights=False)`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import numpy as np

from smartbrush_jax import compile_report, tpu_targets

GIB = 2**30


def per_chip_batch(config, n_devices: int) -> int:
    return config.train.batch_size // n_devices


def with_batch(config, per_chip: int, n_devices: int):
    """A copy of `config` with the global batch `per_chip` x devices."""
    c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    c.train.batch_size = per_chip * n_devices
    return c


@dataclasses.dataclass
class Compiled:
    compiled: object  # jax.stages.Compiled
    mesh: object
    models: object
    trainable_parameters: int  # elements of the trained parameters (the U-Net's)
    seconds: float  # to compile


def compile_step(config, devices, cached: bool = False) -> Compiled:
    """The train step compiled for `devices` (a slice's, or real ones)."""
    from smartbrush_jax import sharding
    from smartbrush_jax.train_state import build_models
    from smartbrush_jax.trainer import abstract_batch, build_step

    models = build_models(config, weights=False)
    mesh = sharding.make_mesh(dict(config.mesh.shape), dict(config.mesh.dcn_shape), devices=devices)
    empty_tokens = np.zeros(77, np.int32)  # a constant of the step: its value does not change the program
    state, frozen, step_fn = build_step(config, models, mesh, empty_tokens, materialize=False)
    batch = abstract_batch(config, models, mesh, cached=cached)
    start = time.time()
    compiled = step_fn.lower(state, frozen, batch).compile()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    return Compiled(compiled, mesh, models, n_params, time.time() - start)


def report(config, target: tpu_targets.Target, cached: bool = False, devices=None) -> dict:
    """Compile and report (see the module docstring); a compile that runs out of the chip's
    memory is a report with `"fits": False` and XLA's message."""
    from smartbrush_jax import flops

    devices = devices if devices is not None else target.devices()
    n = len(devices)
    head = {"topology": target.name, "topology_name": target.topology_name, "chips": n, "slices": target.slices,
            "chip": dataclasses.asdict(target.chip), "per_chip_batch": per_chip_batch(config, n),
            "global_batch": config.train.batch_size, "resolution": config.data.resolution,
            "vae_in_step": not cached and config.model.autoencoder != "identity", "cached_latents": cached,
            "remat": config.model.remat, "attention": config.model.attention_impl or "xla (jax default)",
            "dtype": config.model.dtype, "mesh": dict(config.mesh.shape), "dcn": dict(config.mesh.dcn_shape),
            "fsdp": bool(config.mesh.fsdp)}
    try:
        c = compile_step(config, devices, cached)
    except Exception as e:  # XLA: RESOURCE_EXHAUSTED (out of HBM) is the answer "does not fit"
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and "memory" in text:
            return {**head, "fits": False, "compile_error": _first_lines(text, 6)}
        raise
    latent = config.data.resolution // c.models.latent_factor
    analytic = flops.train_step_flops(flops.unet_forward_flops(c.models.unet.config, head["per_chip_batch"], latent,
                                                              latent, 77))
    chip = target.chip
    r = compile_report.step_report(c.compiled, analytic_flops=analytic, peak_flops=chip.bf16_tflops * 1e12,
                                   hbm_bytes=chip.hbm_gib * GIB, hbm_bytes_per_s=chip.hbm_gbps * 1e9)
    r["flops"]["analytic_note"] = "our count: the U-Net forward + backward (3x forward) only"
    if r.get("estimate", {}).get("seconds"):
        r["images_per_s_per_chip"] = head["per_chip_batch"] / r["estimate"]["seconds"]
    return {**head, **r, "fits": r["memory"].get("fits"), "compile_seconds": c.seconds,
            "trainable_parameters": c.trainable_parameters, "mesh_axes": dict(c.mesh.shape)}


def _first_lines(text: str, n: int) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][:n])[:2000]


def find_max_batch(config, target: tpu_targets.Target, cached: bool = False, start: Optional[int] = None,
                   max_compiles: int = 5, log: Callable[[str], None] = print, devices=None,
                   on_compile: Optional[Callable[[dict], None]] = None) -> dict:
    """The largest per-chip batch whose step fits, in few compiles: memory grows about
    linearly with the batch, so two fitting compiles give the line, the line predicts the
    largest batch (from one fit: the state's bytes are fixed and the temporaries grow in
    proportion to the batch), and that prediction and the batch above it are checked (a failure lowers
    the bound, a fit raises it). Every compile's result is kept in `tried`;
    `on_compile(search so far)` after each one lets a caller keep it (a compile of the full
    step can exhaust the host's memory and be killed: what the earlier ones found is kept)."""
    devices = devices if devices is not None else target.devices()
    n = len(devices)
    hbm = target.chip.hbm_gib * GIB
    tried: Dict[int, dict] = {}

    def attempt(b: int) -> bool:
        if b in tried:
            return bool(tried[b]["fits"])
        t = time.time()
        r = report(with_batch(config, b, n), target, cached, devices)
        tried[b] = r
        total = r.get("memory", {}).get("total")
        log(f"  per-chip batch {b}: {'fits' if r['fits'] else 'does not fit'}"
            + (f" ({total / GIB:.2f} GiB of {hbm / GIB:.0f})" if total else "") + f" [{time.time() - t:.0f}s]")
        return bool(r["fits"])

    b = start or max(1, per_chip_batch(config, n))
    lo, hi = 0, None  # the largest batch known to fit, the smallest known not to
    while len(tried) < max_compiles:
        if attempt(b):
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if on_compile is not None:
            on_compile(_search_result(tried, lo, hi, hbm))
        if hi is not None and hi - lo <= 1:
            break
        b = _next_batch(tried, lo, hi, hbm)
    return _search_result(tried, lo, hi, hbm)


def _search_result(tried: Dict[int, dict], lo: int, hi: Optional[int], hbm: float) -> dict:
    exact = hi is not None and hi - lo == 1
    limit = _line_limit(tried, hbm)
    if hi is not None and limit is not None:
        limit = min(limit, hi - 1)
    return {"max_per_chip_batch": lo or None, "first_failure": hi, "exact": exact,
            "predicted_max_per_chip_batch": None if limit is None else max(lo, int(limit)),
            "prediction": "memory linear in the batch through the fitting compiles (not compiled)",
            "compiles": len(tried), "tried": {str(k): _brief(v) for k, v in sorted(tried.items())},
            "report": tried.get(lo)}


def _next_batch(tried: Dict[int, dict], lo: int, hi: Optional[int], hbm: float) -> int:
    """The next batch to compile: where the line through the two largest fits reaches the
    HBM, kept strictly between what is known to fit and what is known not to."""
    fits = [k for k, v in tried.items() if v["fits"]]
    if not fits:
        return max(1, hi // 2)  # nothing fits yet: halve
    limit = _line_limit(tried, hbm)
    if limit is None:
        guess = 2 * lo
    else:  # from one fit, aim a little under the line's limit so that the second compile likely fits
        guess = int(limit if len(fits) >= 2 else 0.95 * limit)
    top = hi - 1 if hi is not None else None
    guess = max(guess, lo + 1)
    if top is not None:
        guess = min(guess, top)
    if guess in tried:  # the line's guess was checked: bisect what is left
        guess = (lo + (hi if hi is not None else 4 * lo)) // 2
    return max(guess, lo + 1)


def _line_limit(tried: Dict[int, dict], hbm: float) -> Optional[float]:
    """The batch at which memory reaches `hbm` on the line through the two largest fitting
    compiles; with one, through it and its fixed part (the state's bytes: everything but
    the temporaries, which grow in proportion to the batch)."""
    fits = sorted((k, v["memory"]) for k, v in tried.items() if v["fits"] and v.get("memory"))
    if not fits:
        return None
    if len(fits) >= 2:
        (b1, m1), (b2, m2) = fits[-2], fits[-1]
        per = (m2["total"] - m1["total"]) / (b2 - b1)
        return b2 + (hbm - m2["total"]) / per if per > 0 else None
    b1, m1 = fits[0]
    return b1 * (hbm - (m1["total"] - m1["temp"])) / m1["temp"] if m1["temp"] > 0 else None


def _brief(r: dict) -> dict:
    m = r.get("memory") or {}
    return {"fits": r["fits"], "total_gib": m.get("total", 0) / GIB if m else None,
            "temp_gib": m.get("temp", 0) / GIB if m else None, "compile_seconds": r.get("compile_seconds")}


def summary_lines(r: dict) -> List[str]:
    inputs = "VAE encode in the step" if r["vae_in_step"] else "cached latents" if r["cached_latents"] else \
        "pixel space"
    lines = [f"{r['topology']} ({r['topology_name']}, {r['chips']} chips, {r['chip']['device_kind']}, "
             f"{r['chip']['hbm_gib']:.0f} GiB HBM): per-chip batch {r['per_chip_batch']} (global "
             f"{r['global_batch']}) at {r['resolution']} px, "
             f"{inputs}, remat {r['remat']}, attention {r['attention']}, {'FSDP' if r['fsdp'] else 'data parallel'}"]
    if r.get("compile_error"):
        lines.append(f"DOES NOT FIT: XLA refused the program: {r['compile_error']}")
    else:
        lines += compile_report.format_report(r).splitlines()
        lines.append(f"compiled in {r['compile_seconds']:.0f}s")
    return lines


if __name__ == "__main__":
    from smartbrush_jax.cli.aot import console

    sys.exit(console())
